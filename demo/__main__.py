import sys

from demo.guide import main

sys.exit(main())
