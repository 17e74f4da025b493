import sys

from finetune_ref.cli.main import main

sys.exit(main())
