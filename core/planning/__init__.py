"""Resolution plans: each site's fingerprint and the one plan the coordinator derives.

nnU-Net plans its preprocessing from a dataset fingerprint (spacings, sizes,
foreground intensities). Here no site's data leaves it, so each site computes its own
fingerprint of aggregates (:mod:`core.planning.fingerprint`), releases it under its
query limits and, where its policy requires, with DP noise (:mod:`core.planning.job`,
the ``query.fingerprint`` action), and the coordinator derives one plan from the
released fingerprints (:mod:`core.planning.rules`): target spacing, in-plane size,
batch size and intensity normalisation per modality. Rules: docs/planning.md.
"""
