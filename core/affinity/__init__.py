"""SeqTran: task affinity and transfer paths (config group ``affinity``).

The method is docs/methods.md#seqtran.
``profile`` is what a site computes and publishes (its task profile) and
``profile_noise`` its optional DP release; ``matrix`` the affinity the coordinator
computes from the profiles; ``graph`` the source graph, communities and landmarks;
``paths`` the transfer-path search and ``path_choice`` the run's path under its
settings; ``job`` the site side (released profile, fine-tuning along the path).
"""
