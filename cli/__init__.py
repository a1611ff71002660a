"""normswap's command-line front end (installed as the ``normswap_cli`` package).

Thin by design: each command parses options, calls one function of the
``normswap`` API and renders its report with rich.  No logic lives here, and
heavy imports (torch, onnx) happen inside the command functions.
"""
