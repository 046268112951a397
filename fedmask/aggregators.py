"""Moved: the plug-in API and the built-in aggregation rules now live in :mod:`fedmask.methods`."""

raise ImportError(
    "fedmask.aggregators was split up (issue 26, one method per module): import MaskAggregator, RoundResult, "
    "weighted_vote and robust_vote from fedmask (they live in fedmask.methods.base and fedmask.methods.votes); "
    "the built-in rules are fedmask.methods.fedpm.FedPMAggregator, edge_popup.EdgePopupAggregator, "
    "biprop.BipropAggregator, slot_machines.SlotMachineAggregator and laperm.LaPermAggregator"
)
