"""FedAvg over one numpy array; prints the final weights as one `hpcfed-result:` line."""

import json

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rounds = int(context.run_config["num-server-rounds"])
    strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=2, min_available_nodes=2)
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord([np.zeros(4, dtype=np.float64)]),
        num_rounds=rounds,
        train_config=ConfigRecord({"round-seconds": float(context.run_config["round-seconds"])}),
    )
    weights = result.arrays.to_numpy_ndarrays()[0]
    print(
        "hpcfed-result: " + json.dumps({"rounds": rounds, "weights": weights.tolist()}), flush=True
    )
