"""DeepSTAPLE and its baselines (config group ``consensus``).

The method is docs/methods.md#deepstaple.
``staple`` holds majority vote, STAPLE and multi-label STAPLE; ``deepstaple`` the
data parameters learned on noisy labels and the softmax-weighted vote; ``registration``
atlas label transfer, one of the label sources; ``noisy_labels`` the controlled noisy
labels of the benchmark; ``job`` the site side of ``train.consensus``.
"""
