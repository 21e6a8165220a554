import sys

from demo.federation import main

sys.exit(main(sys.argv[1:]))
