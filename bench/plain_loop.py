"""The same federated training as a fedmask run, in a plain PyTorch loop (no Flower, no Ray).

Same config, same seeds, same client training and the same aggregation classes; what is
missing is Flower's messaging, so timing it against `fedmask run` shows Flower's cost.
"""

from __future__ import annotations

import time
from typing import Any

from fedmask import task
from fedmask.config import RunConfig
from fedmask.core.masking import check_batchnorm, get_scores
from fedmask.core.sampling import sample_partitions
from fedmask.core.weights import derive_seed
from fedmask.recycling import apply_plan, is_recycle_round, recycle_plan
from fedmask.wire.frame import Layout


def run_plain(config: RunConfig) -> dict[str, Any]:
    """Rounds of sample -> local train -> aggregate -> evaluate; returns accuracies."""
    check_batchnorm(config.batchnorm, config.model)  # one model trained by every client in turn
    splits = task.splits_of(config)
    device = task.pick_device(config)
    method = config.method_entry
    mode = task.mode_of(config, method.mask_mode)
    aggregator = None if mode is None else method.make_aggregator(config)
    model = task.make_model(config, splits, mode)
    state = task.dense_state(model) if aggregator is None else aggregator.initial_state(get_scores(model))
    layout = Layout.from_arrays(state)
    accuracies, elapsed, start = [], [], time.perf_counter()
    for server_round in range(1, config.num_rounds + 1):
        masks, weights, dense_states = [], [], []
        # the round's starting scores, computed once as the engines' clients do (one
        # logit(theta) per broadcast, not per client: about 2 ms a FedPM client)
        scores = {} if mode is None else mode.scores_of_state(state)
        for pid in sample_partitions(config.seed, config.num_clients, config.clients_per_round, server_round):
            x, y = task.client_data(config, pid)
            if mode is None:
                task.load_dense_state(model, state)
            else:
                mode.load_scores(model, scores)
            seed = derive_seed(config.seed, "train", server_round, pid)
            task.train(model, x, y, config, device, seed, mode)
            weights.append(float(len(x)))
            if mode is None:
                dense_states.append(task.dense_state(model))
            else:
                masks.append(mode.votes(mode.upload(model), layout))
        if mode is None or aggregator is None:
            total = sum(weights)
            state = {k: sum(w * s[k] for w, s in zip(weights, dense_states)) / total for k in state}
            task.load_dense_state(model, {k: v.astype(state[k].dtype) for k, v in state.items()})
        else:
            state = aggregator.aggregate(server_round, state, masks, weights)
            mode.load_state(model, state)
            if is_recycle_round(config, server_round):  # the model persists here: apply in place
                apply_plan(model, recycle_plan(state, config.recycle_fraction))
        # sampled evaluation masks seeded by the round, as server.server_app.evaluate_global's
        _, acc = task.evaluate(model, splits.x_test, splits.y_test, config.eval_batch_size, device,
                               seed=derive_seed(config.seed, "eval", server_round))
        accuracies.append(acc)
        elapsed.append(time.perf_counter() - start)
    # elapsed_s: after each round, so that s/round can leave out round 1 (first calls, and for
    # LaPerm torch.optim's import of torch._dynamo, about 2.6 s here), as the engines' figures do
    return {"accuracy": accuracies, "wall_s": time.perf_counter() - start, "elapsed_s": elapsed}
