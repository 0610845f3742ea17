import sys

from loss_service.export.__main__ import main

sys.exit(main())
