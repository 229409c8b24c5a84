"""TGMA (config groups ``transfer`` and ``adapt``; docs/methods.md#tgma).

``transferability`` holds LFTM, ITM, DTM, source selection and pseudo-label
correction; ``adaptation`` the target optimisation of the main/auxiliary pair;
``job`` the site side of ``query.lftm`` and ``train.adapt``.
"""
