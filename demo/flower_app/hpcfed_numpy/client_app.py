"""Each training round: add 1.0 to every weight (after waiting round-seconds, to be preemptible)."""

import time

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    time.sleep(float(msg.content["config"]["round-seconds"]))
    weights = msg.content["arrays"].to_numpy_ndarrays()
    updated = ArrayRecord([w + 1.0 for w in weights])
    metrics = MetricRecord({"num-examples": 1})
    return Message(RecordDict({"arrays": updated, "metrics": metrics}), reply_to=msg)
