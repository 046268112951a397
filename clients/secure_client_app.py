"""The ClientApp for FedPM under Flower's SecAgg+: the server learns only sums of masks.

``secaggplus_mod`` runs the SecAgg+ protocol around the same local training as the plain
ClientApp. The mask travels as 0/1 values that the mod quantizes, masks and shares, so
the upload costs far more than a packed mask: the ledger shows how much.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins

from clients.local_round import answer_query, local_round, on_this_node
from fedmask.core.threads import use_threads
from fedmask.protocol.instruction import TrainInstruction

app = ClientApp(mods=[secaggplus_mod])
app.query()(answer_query)  # which partition this node holds (the mod passes queries through)


@app.train()
def train(msg: Message, context: Context) -> Message:
    fitins = recorddict_to_fitins(msg.content, keep_input=True)
    instruction = on_this_node(TrainInstruction.from_flat(fitins.config), context.node_config)
    use_threads(instruction.config.num_cpus)
    names = [str(name) for name in str(fitins.config["tensor-names"]).split(",")]
    arrays = dict(zip(names, parameters_to_ndarrays(fitins.parameters), strict=True))
    done = local_round(instruction, arrays)
    assert done.mode is not None
    masks = done.mode.upload(done.model)  # one Bernoulli sample
    # one weight per client: FedPM counts masks unweighted, and sums are what the server sees
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([masks[n].astype(np.float32) for n in names]),
                    num_examples=1, metrics=dict(done.metrics))
    return Message(fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)
