"""The whole-federation demo on the local test cluster (`make demo`), also the e2e tests' driver.

`python -m demo` runs NVFlare's; `python -m demo flower` Flower's (`make demo FRAMEWORK=flower`);
`down` after either cleans it up.
"""

import sys

if sys.argv[1:2] == ["flower"]:
    from demo.flower import main
else:
    from demo.federation import main

sys.exit(main(sys.argv[2:] if sys.argv[1:2] == ["flower"] else sys.argv[1:]))
