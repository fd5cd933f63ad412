"""The DIMSE edge: a pynetdicom Application Entity that translates DIMSE
services into calls on the core's services.

It never imports Flask or :mod:`dicomweb`; the core's errors are mapped to
DIMSE status codes here and nowhere else.
"""
