"""``lorakit review PIPELINE_OR_DATASET``: serve the review page (uvicorn) and open a browser."""
from __future__ import annotations

import ipaddress
import socket
import sys
import threading
import webbrowser
from pathlib import Path

import click

from lorakit.plugin_sdk import LorakitError

DEFAULT_PORT = 8765


def resolve_target(path: Path) -> tuple[Path, Path | None]:
    """(dataset folder, pipeline file or None) for a pipeline.yaml, a dataset folder or its manifest."""
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        from lorakit.host import get_host
        from lorakit.pipeline import load_pipeline

        pipeline = load_pipeline(path, get_host())
        if not (pipeline.output / "manifest.json").is_file():
            raise LorakitError(f"{path}: its dataset {pipeline.output} has no manifest.json yet "
                               f"(run `lorakit run {path}` first)")
        return pipeline.output, path.resolve()
    if path.is_file() and path.name == "manifest.json":
        path = path.parent
    if path.is_dir() and (path / "manifest.json").is_file():
        for name in ("pipeline.yaml", "pipeline.yml"):  # a dataset beside or under its pipeline
            for folder in (path.parent, path):
                if (folder / name).is_file():
                    try:
                        from lorakit.host import get_host
                        from lorakit.pipeline import load_pipeline

                        if load_pipeline(folder / name, get_host()).output.resolve() == path.resolve():
                            return path, (folder / name).resolve()
                    except LorakitError:
                        pass
        return path, None
    raise LorakitError(f"{path}: not a pipeline file or a dataset folder with manifest.json")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _listen(host: str, port: int) -> socket.socket:
    """Bind the listening socket first: the port (even --port 0's) is known before the page exists,
    so the Host check never has a gap, and a port in use is a clear error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise LorakitError(f"cannot listen on {host} port {port} ({exc.strerror}): another `lorakit review`? "
                           "Pick a port with --port, or --port 0 for any free one") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


@click.command("review", short_help="Look at a dataset in the browser and curate it by hand.")
@click.argument("target", metavar="PIPELINE_OR_DATASET", type=click.Path(exists=True))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to serve on; other than loopback needs --allow-remote")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True,
              help="port (0: any free one)")
@click.option("--allow-remote", is_flag=True, help="allow a non-loopback --host (visitors still need the token)")
@click.option("--no-browser", is_flag=True, help="print the URL only, do not open a browser")
def review(target, host, port, allow_remote, no_browser):
    """Open the review page for a pipeline's dataset (or a dataset folder).

    \b
    A gallery with filters (tags AND/OR/NOT, subset, bucket, mask, set
    aside, duplicates, edited), batch tag edits, exclude/restore, undo, and
    views of set-aside images, duplicate groups, masks and bucket stats.
    Every edit goes to the curation file and the caption files at once.
    Serves on 127.0.0.1; the printed URL carries an access token.
    """
    import uvicorn

    from .app import create_app
    from .security import allowed_hosts

    dataset, pipeline = resolve_target(Path(target))
    if not is_loopback(host) and not allow_remote:
        raise LorakitError(f"--host {host} would let other machines reach the page: add --allow-remote "
                           "to do that on purpose (the access token printed with the URL is then required)")
    sock = _listen(host, port)
    port = sock.getsockname()[1]
    app = create_app(dataset, pipeline, hosts=allowed_hosts(host, port), prefetch=True)
    config = uvicorn.Config(app, log_level="warning", lifespan="off", server_header=False, date_header=False)
    server = uvicorn.Server(config)

    def announce():
        while not server.started:
            if server.should_exit:
                return
            threading.Event().wait(0.05)
        shown = host if ":" not in host or host.startswith("[") else f"[{host}]"
        url = f"http://{shown}:{port}/?token={app.token}"
        from lorakit.curation import curation_path_for

        images = sum(1 for e in app.review.data.entries if e.kind == "image")
        click.echo(f"Reviewing {dataset} ({images} images); edits go to {curation_path_for(pipeline or dataset)}")
        click.echo(f"Open {url}\nPress Ctrl+C to stop.")
        sys.stdout.flush()
        if not no_browser:
            try:
                webbrowser.get()
            except webbrowser.Error:
                return  # no browser here (a server, a container): the URL is printed
            webbrowser.open(url)

    threading.Thread(target=announce, daemon=True).start()
    server.run(sockets=[sock])
