"""Serving: the refusal-aware model on Ray Serve (autoscaled) with an HTTP API and a Gradio demo.

`serve.model` holds the model deployment's class, `serve.app` the ingress and the `build_app` builder,
`serve.api` the routes and request checks, `serve.gradio_demo` the UI; `python -m serve --checkpoint DIR`
runs it all on 127.0.0.1.
"""
