"""`python -m gateway` (`layerline serve`): the OpenAI-compatible HTTP API of a cluster.

    python -m gateway [--broker URL] [--host 127.0.0.1] [--port 8000] [--api-key KEY]
                      [--model-name NAME] [--cert FILE --broker-key KEY]

Failures at start exit 2 with one line on stderr.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from collections.abc import Sequence

import structlog

from client.errors import ClientError
from common.defaults import CLIENT_CONNECT_TIMEOUT_S, default_broker
from common.logs import configure_logging

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
# The environment variable that holds the API key, so that it stays out of `ps` listings.
API_KEY_ENV = "LAYERLINE_API_KEY"

log = structlog.get_logger("gateway")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gateway",
        description="An OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, "
        "/v1/models, /health) in front of a layerline broker.",
    )
    p.add_argument("--broker", default=default_broker(), help="broker URL (default: %(default)s)")
    p.add_argument(
        "--host", default=DEFAULT_HOST, help="address to listen on (default: %(default)s)"
    )
    p.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="HTTP port (default: %(default)s)"
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        metavar="KEY",
        help=f"the key clients must send as 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}; "
        "none: no key asked for)",
    )
    p.add_argument(
        "--model-name",
        default=None,
        metavar="NAME",
        help="the model's id in the API (default: the checkpoint's file or directory name)",
    )
    p.add_argument(
        "--cert",
        default=None,
        metavar="FILE",
        help="this client's secret certificate (NAME.key_secret), for a broker with keys",
    )
    p.add_argument(
        "--broker-key",
        default=None,
        metavar="KEY",
        help="the broker's public key: its broker.key file, or the 40-character key",
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=CLIENT_CONNECT_TIMEOUT_S,
        metavar="S",
        help="seconds to wait for the broker's answer (default: %(default)s)",
    )
    p.add_argument(
        "--ssl-certfile", default=None, metavar="FILE", help="serve HTTPS with this certificate"
    )
    p.add_argument(
        "--ssl-keyfile", default=None, metavar="FILE", help="the certificate's private key"
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="listen off loopback without an API key or without TLS",
    )
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    if not 0 < args.port < 65536:
        parser.error(f"--port must be in 1-65535, got {args.port}")
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        parser.error("--ssl-certfile and --ssl-keyfile go together")
    if not is_loopback(args.host) and not args.insecure:
        missing = [
            what
            for what, given in (("--api-key", args.api_key), ("--ssl-certfile", args.ssl_certfile))
            if not given
        ]
        if missing:
            parser.error(
                f"listening on {args.host}, off loopback, needs {' and '.join(missing)}: anyone "
                "on the network could use the cluster, and read the key and the text sent; "
                "--insecure listens anyway"
            )
    import uvicorn  # deferred, as the client is: --help answers at once

    from gateway.app import GatewayConfig, create_app

    config = GatewayConfig(
        broker=args.broker,
        api_key=args.api_key or None,
        model_name=args.model_name,
        cert=args.cert,
        broker_key=args.broker_key,
        connect_timeout=args.connect_timeout,
    )
    try:
        app = create_app(config)
    except ClientError as e:  # a bad broker URL or key file
        print(f"gateway: {e}", file=sys.stderr)
        return 2
    configure_logging(args.log_level)
    scheme = "https" if args.ssl_certfile else "http"
    log.info("gateway_starting", url=f"{scheme}://{args.host}:{args.port}/v1", broker=args.broker)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",  # one line per request comes from the gateway's own log
        access_log=False,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
