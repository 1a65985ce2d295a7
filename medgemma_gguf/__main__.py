import sys

from medgemma_gguf.cli import main

sys.exit(main())
