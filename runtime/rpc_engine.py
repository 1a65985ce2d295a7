"""The engine process of a model split across RPC workers (started by ``runtime.rpc_model.RpcChatModel``).

``python -m medgemma_gguf.runtime.rpc_engine FD``: FD is the child's end of a socket pair; the first message on it
is the load request. A separate module, so that what the engine sends back pickles as
``medgemma_gguf.runtime.rpc_model`` classes and not as this ``__main__``'s.
"""

from __future__ import annotations

import sys

from medgemma_gguf.runtime.rpc_model import serve_parent

if __name__ == "__main__":
    serve_parent(int(sys.argv[1]))
