"""A Fed-BioMed researcher's experiment: wait for the nodes, then the federated mean.

Runs inside the Fed-BioMed image (the researcher role's command). FBM_TAG: the dataset tag to
search; FBM_EXPECTED_NODES: how many nodes must hold it; FBM_SECAGG=1: secure aggregation.
Experiment(tags) asks only the nodes connected at that moment (nodes dial in every 2 s), hence
the wait. Prints one line `FEDERATED-MEAN {"column": mean, ...}` (the pooled mean of each column).
"""

import json
import os
import sys
import time

from fedbiomed.researcher.federated_workflows import Experiment

tags = [os.environ.get("FBM_TAG", "hpcfed-demo")]
expected = int(os.environ.get("FBM_EXPECTED_NODES", "2"))
secagg = os.environ.get("FBM_SECAGG", "0") == "1"

exp = Experiment(tags=tags, secagg=secagg)
deadline = time.monotonic() + float(os.environ.get("FBM_WAIT_NODES", "600"))
while len(exp.training_data().node_ids()) < expected:
    if time.monotonic() > deadline:
        sys.exit(f"only {len(exp.training_data().node_ids())} of {expected} nodes joined")
    time.sleep(2)
    exp.set_training_data(None, from_tags=True)
mean = exp.analytics.mean()
print("FEDERATED-MEAN " + json.dumps(mean, sort_keys=True, default=float), flush=True)
