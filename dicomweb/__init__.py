"""The DICOMweb edge: a Flask application (PS3.18) that translates HTTP
transactions into calls on the core's services.

Built by :func:`dicomweb.app.create_app`.  It never imports pynetdicom or
:mod:`dimse_bridge`; the core's errors are mapped to HTTP only in
:mod:`dicomweb.errors`.
"""
