"""The fedmask ClientApp: train scores locally, upload a coded mask, never weights.

Everything a client needs comes in the message: the global state (probabilities or
scores; dense weights for the FedAvg baseline) and a :class:`TrainInstruction` (the run
config, the round, the partition id and the mask mode). The frozen weights are
regenerated here from the seed; the round itself is :mod:`clients.local_round`'s, and what
a process keeps between messages (its model, decoded broadcasts) :mod:`clients.received`'s.

A SuperNode started with ``--node-config "partition-id=K num-partitions=N"`` (N the run's
``num-clients``) holds partition K and trains on it whatever the message says; the server
learns which node holds what from a QUERY message (see :mod:`fedmask.protocol.placement`).
A node config may also set ``data-dir``, where this node keeps its dataset files. This is
also the app ``flwr run`` starts: a SecAgg+ message goes to the secure ClientApp
(:mod:`clients.secure_client_app`).
"""

from __future__ import annotations

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from clients.local_round import answer_query, compressed_upload, local_round, on_this_node, recycle_log, reply_of
from clients.received import receive_lossless
from fedmask import downlink
from fedmask.core.threads import use_threads
from fedmask.faults import client_fault
from fedmask.protocol.instruction import TrainInstruction

app = ClientApp()

SECAGG_RECORD = "secaggplus_configs"  # flwr.common.secure_aggregation.secaggplus_constants.RECORD_KEY_CONFIGS


app.query()(answer_query)  # which partition this node holds (a deployment asks before round 1)


@app.train()
def train(msg: Message, context: Context) -> Message:
    if SECAGG_RECORD in msg.content.config_records:  # a SecAgg+ stage: the run asked for secure aggregation
        from clients.secure_client_app import app as secure_app

        return secure_app(msg, context)
    instruction = on_this_node(TrainInstruction.from_flat(msg.content["config"]), context.node_config)
    config, server_round, pid = instruction.config, instruction.server_round, instruction.partition_id
    use_threads(config.num_cpus)
    fault = client_fault(config, server_round, pid)
    if fault == "drop":  # the simulator's mark of a client that never answers (see the ledger)
        return Message(RecordDict({}), reply_to=msg)
    if fault == "crash":
        raise RuntimeError(f"injected crash (fault-crash-rate) in round {server_round}, client {pid}")
    arrays = {name: array.numpy() for name, array in msg.content.array_records["arrays"].items()}
    confirm = None
    if downlink.RECORD in arrays:  # the masks' lossless downlink, or the dense baselines' ef-qsgd
        arrays, confirm = receive_lossless(arrays[downlink.RECORD], instruction, context)
    done = local_round(instruction, arrays, recycle_log(msg))
    upload = None
    if done.mode is None and config.method_entry.compressor:
        upload = compressed_upload(done, instruction, context, fault == "corrupt")
    return reply_of(msg, instruction, done, fault, upload, confirm)
