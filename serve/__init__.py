"""Serving: a run's methods (or one checkpoint) behind one OpenAI-compatible endpoint and the comparison demo.

`serve.llm_app` builds the one app: the ingress (`serve.llm_ingress`: names, prompt, input rules, keys,
caps, refusal flags, `/v1/answer`, `/demo`) in front of vLLM deployments (`serve.llm_server`) or, where
vLLM is missing or lacks the architecture, transformers deployments (`serve.transformers_server`).
`serve.chat_rules` and `serve.api` hold the rules and guards (pure, tested without Ray), `serve.auth` the
key; `python -m serve` runs it on 127.0.0.1.
"""
