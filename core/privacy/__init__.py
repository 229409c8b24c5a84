"""Privacy and audit (config group ``privacy``; docs/privacy.md): what protects a site.

``policy`` is what a site answers and releases and the checks of every reply;
``limits`` its query limits and budget; ``egress`` what one message carries; ``ledger``
the tamper-evident egress ledger and ``ledger_match`` its check against the
coordinator's; ``approvals`` the app bundles a site serves; ``dp`` DP-SGD, Gaussian
releases and the accountant (the only Opacus importer); ``audit`` the
membership-inference audit.
"""
