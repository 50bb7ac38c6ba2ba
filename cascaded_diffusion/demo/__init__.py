"""``cdm demo``: a small web page that samples a cascade and shows, per stage, its output and the conditioning
input it really received (docs/demo.md).

:mod:`.engine` holds everything but the web server (parameters, one-at-a-time sampling, progress, PNGs) and needs
nothing beyond the library; :mod:`.app` is the Starlette app and the uvicorn server (``pip install
'cascaded-diffusion[demo]'``), imported only when a demo is served.
"""
