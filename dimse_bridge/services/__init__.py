"""One module per DIMSE service.  Each exposes

``register(ae, config, services) -> list[EventHandlerType]``

which adds the service's presentation contexts to the acceptor *ae* and
returns its event handlers, dependencies bound in.  :func:`dimse_bridge.ae.build_ae`
finds the modules here, so adding a service touches no other file.
"""
