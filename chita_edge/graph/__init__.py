"""Model plumbing for structured pruning, on a ``torch.fx`` trace: channel groups, residual blocks, structural
plans, compaction and MAC counts.

This package only knows ``torch`` (it never imports ``chita_edge.pruning``): the exporters use it to lay out a
compact model, the pruning side uses it to know which weights form one channel.

* ``trace``: the one fx tracer and the op vocabulary (which nodes are convs, BatchNorms, adds, activations);
* ``channels``: ``channel_groups`` -- which Conv/Linear/BatchNorm slices form one prunable channel (the walker);
* ``members``: the data of channel groups (``Member``, ``ChannelGroupSpec``, ``BlockedGroup``);
* ``residual``: ``residual_blocks`` -- identity-shortcut blocks that can be removed whole;
* ``plan``: ``plan_from_zeros`` / ``apply_plan`` -- versioned JSON plans of what a pruned model loses;
* ``compact``: ``compact_model`` -- a copy with the zero channels and blocks physically removed;
* ``macs``: ``count_macs`` -- multiply-accumulates per Conv/Linear module.
"""
