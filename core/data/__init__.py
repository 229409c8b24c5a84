"""Site data: the site folder, its images and labels, and the synthetic federations.

``dataset`` indexes and validates a site folder and cuts its volumes into 2-D slices;
``io`` reads and writes image files (the only SimpleITK importer here); ``site`` is the
site folder as its SuperNode sees it (policy and data checked together); ``synthetic``
and ``synthetic_chain`` write the built-in federations in the same layout.
"""
