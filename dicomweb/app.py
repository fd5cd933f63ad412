"""The application factory of the DICOMweb edge.

``create_app(config)`` is what gunicorn's workers load (one app per worker,
built after the fork).  The app keeps what its views need in
``app.extensions["appliance"]``, an :class:`ApplianceExtension`: the
configuration, and the core's services, built on first use in the process
that uses them, so a database connection is never shared across a fork.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import threading
from pathlib import Path

from flask import Blueprint, Flask, current_app

from appliance.access import Authenticator
from appliance.audit import AuditLog
from appliance.config import Config
from appliance.services import Services, build_services
from dicomweb import audit
from dicomweb.auth import install_auth
from dicomweb.cors import install_cors
from dicomweb.errors import refuse_hostile_paths, register_error_handlers
from dicomweb.instrument import Counting, note_transaction
from dicomweb.partitioning import PartitionRouting, check_partition, partition_services

#: The key of :class:`ApplianceExtension` in ``app.extensions``.
EXTENSION = "appliance"


class ApplianceExtension:
    """The configuration and the core's services of one app.

    Parameters
    ----------
    config
        The appliance configuration.
    services
        Services built by the caller (who also closes them); when None they
        are built by :func:`appliance.services.build_services` on first use,
        once per process, and closed by :meth:`close`.
    """

    def __init__(
        self, config: Config, services: Services | None = None, run_dir: Path | None = None
    ) -> None:
        self.config = config
        self.run_dir = run_dir
        self._services = services
        self._owned = services is None
        self._built_in = os.getpid()
        self._lock = threading.Lock()
        #: the audit trail of the requests this app answers (it opens its
        #: file in the process that writes, after any fork)
        self.audit = AuditLog(config.audit)
        #: who makes each request (set by :func:`create_app`; the console's
        #: login checks a pasted token with it)
        self.authenticator: Authenticator | None = None

    @property
    def services(self) -> Services:
        """The services, built on first use in this process.

        Raises
        ------
        SchemaNotCurrent, ConfigError
            as :func:`~appliance.services.build_services` does; the next use
            tries again.
        """
        services = self._services
        if services is not None and (not self._owned or self._built_in == os.getpid()):
            return services
        with self._lock:
            if self._services is None or (self._owned and self._built_in != os.getpid()):
                # never reuse (nor close) services inherited through a fork
                self._services = build_services(self.config)
                self._built_in = os.getpid()
            return self._services

    def close(self) -> None:
        """Close the services this extension built in this process."""
        with self._lock:
            if self._owned and self._services is not None and self._built_in == os.getpid():
                self._services.close()
            if self._owned:
                self._services = None
        self.audit.close()


def create_app(
    config: Config, services: Services | None = None, run_dir: Path | None = None
) -> Flask:
    """The DICOMweb Flask application.

    Parameters
    ----------
    config
        The appliance configuration.
    services
        The core's services; when None each process builds its own on first
        use (see :class:`ApplianceExtension`).
    run_dir
        The supervisor's run folder, where the DIMSE process says it is ready
        (:mod:`appliance.runstate`); None when no supervisor runs this app.
    """
    # no static folder: every route is one of ours, with its permission
    app = Flask(__name__, static_folder=None)
    extension = ApplianceExtension(config, services, run_dir)
    app.extensions[EXTENSION] = extension
    register_error_handlers(app)
    install_cors(app, config.http.cors_allowed_origins)
    app.before_request(note_transaction)
    extension.authenticator = Authenticator(config.auth, lambda: extension.services.engine)
    install_auth(app, extension.authenticator, config.http.public_url)
    app.before_request(refuse_hostile_paths)
    app.before_request(check_partition)
    app.teardown_request(lambda _exc: audit.capture(extension.audit))
    routed = PartitionRouting(app.wsgi_app, config.partitions.enabled)
    app.wsgi_app = Counting(routed)  # type: ignore[method-assign]

    for blueprint in _blueprints():
        app.register_blueprint(blueprint)
    return app


def _blueprints() -> list[Blueprint]:
    """The ``bp`` of every module of :mod:`dicomweb.views`, one blueprint per
    transaction family (each names its own URL prefix)."""
    from dicomweb import views

    found = []
    for info in sorted(pkgutil.iter_modules(views.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{views.__name__}.{info.name}")
        found.append(module.bp)
    return found


def get_extension(app: Flask | None = None) -> ApplianceExtension:
    """The :class:`ApplianceExtension` of *app* (default: the current app)."""
    target = current_app if app is None else app
    extension = target.extensions[EXTENSION]
    assert isinstance(extension, ApplianceExtension)
    return extension


def current_services() -> Services:
    """The core's services of the current app (built on first use), bound
    to the data partition the request's path names (the default partition
    when it names none: :mod:`dicomweb.partitioning`)."""
    return partition_services(get_extension().services)


def close_app(app: Flask) -> None:
    """Release what *app* opened in this process (database connections)."""
    get_extension(app).close()
