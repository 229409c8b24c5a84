"""Networks and supervised training: what every method's training builds on.

``networks`` builds the segmentation networks and converts their weights to the wire
form; ``loop`` is the scaffold every training loop shares (mixed precision, clock,
progress); ``trainer`` is the supervised loop, batched inference and device choice.
The site jobs ``train.source`` (``job``) and ``evaluate`` (``evaluation``) live here
because they belong to no single method.
"""
