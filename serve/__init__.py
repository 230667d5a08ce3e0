"""Serving: the refusal-aware model on Ray Serve (autoscaled) with an HTTP API and a Gradio demo.

`serve.app` holds the deployments and the `build_app` builder, `serve.api` the routes and request checks,
`serve.gradio_demo` the UI; `python -m serve --checkpoint DIR` runs it all on 127.0.0.1.
"""
