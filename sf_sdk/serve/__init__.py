"""sf-serve: live video to the browser, many sessions per process in one stream pool.

``sf-serve --model shapes-tiny`` (or ``python -m sf_sdk.serve``) serves the live page and the
session WebSocket on 127.0.0.1:8000. The app is :func:`sf_sdk.serve.app.create_app`; the
generation engine :mod:`sf_sdk.serve.engine`; the protocol :mod:`sf_sdk.serve.protocol`
(documented in docs/serving.md). Needs the ``serve`` extra (Starlette, uvicorn, websockets,
Pillow, prometheus-client).
"""
