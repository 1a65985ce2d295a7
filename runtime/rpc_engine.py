"""The engine process of a model split across RPC workers.

``python -m medgemma_gguf.runtime.rpc_engine FD``: the model of ``runtime.rpc_model.RpcChatModel``;
``... --serve FD``: the server behind ``serve --rpc`` (``runtime.rpc_serve``). FD is the child's end of a socket
pair; the first message on it is the load request. A module of its own, so that what the engine sends back
pickles as ``runtime.rpc_model`` classes and not as this ``__main__``'s.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from medgemma_gguf.privacy import enable_offline, offline_requested

    if offline_requested():  # the parent was offline (serve always is): so is its engine, with the same workers
        enable_offline()
    if sys.argv[1] == "--serve":
        from medgemma_gguf.runtime.rpc_serve import engine_main

        engine_main(int(sys.argv[2]))
    else:
        from medgemma_gguf.runtime.rpc_model import serve_parent

        serve_parent(int(sys.argv[1]))
