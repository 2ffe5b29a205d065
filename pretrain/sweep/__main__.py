import sys

from pretrain.sweep.plan import main

sys.exit(main())
