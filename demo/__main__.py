"""The whole-federation demo on the local test cluster (`make demo`), also the e2e tests' driver.

`python -m demo` runs NVFlare's; `python -m demo flower` Flower's (`make demo FRAMEWORK=flower`),
`python -m demo fedbiomed` Fed-BioMed's (`make demo FRAMEWORK=fedbiomed`; its image is ~3.5 GB);
`down` after any of them cleans it up.
"""

import sys

framework = sys.argv[1] if sys.argv[1:2] in (["flower"], ["fedbiomed"]) else None
if framework == "flower":
    from demo.flower import main
elif framework == "fedbiomed":
    from demo.fedbiomed import main
else:
    from demo.federation import main

sys.exit(main(sys.argv[2:] if framework else sys.argv[1:]))
