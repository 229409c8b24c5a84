"""UG-MCL (config group ``semisup``; docs/methods.md#ug-mcl).

``dual_task`` is the network with a signed-distance head; ``terms`` the formulas
(signed distances, schedules, mean teacher, losses); ``training`` the
uncertainty-guided mutual-consistency loop; ``job`` one round of ``train.semisup`` at
a site.
"""
