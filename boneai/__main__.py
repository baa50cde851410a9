import sys

from boneai.cli import main

sys.exit(main())
