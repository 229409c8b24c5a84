"""The ``security`` benchmark: what an adversarial coordinator reconstructs at a site.

``run`` is the benchmark; ``attacks`` the reconstruction attacks against the real
ClientApp; ``patterns`` the crafted models; ``queries`` the ``query.lftm`` and
``query.profile`` channels; ``fallbacks`` how the attacker plans around a site's
limits; ``decode`` and ``volume`` turn returned Dice values back into label maps;
``scoring`` scores what came back against the true maps.
"""
