"""Small steps used by the foundation tests (importable, so worker processes can load them)."""
from __future__ import annotations

from PIL import ImageOps

from lorakit.plugin_sdk import DatasetStep, ImageStep, Param, SkipImage


class InvertStep(ImageStep):
    """Invert colours; set aside images whose first pixel is pure red when asked to."""

    name = "invert"
    summary = "Invert colours (test step)."
    params = [Param("skip_red", bool, False, "set aside images whose top-left pixel is red"),
              Param("label", str, "inverted", "tag added to each image")]

    def process(self, item, ctx):
        im = item.open().convert("RGB")
        if self.options.skip_red and im.getpixel((0, 0)) == (255, 0, 0):
            raise SkipImage("top-left pixel is red")
        return item.with_image(ImageOps.invert(im), tags={**item.tags, self.options.label: None})


class TagStep(ImageStep):
    """Add a tag; touches only tags (the image file is passed through)."""

    name = "addtag"
    summary = "Add a tag (test step)."
    params = [Param("tag", str, "tagged", "the tag to add")]

    def process(self, item, ctx):
        return item.replace(tags={**item.tags, self.options.tag: 1.0})


class InterruptAfter(ImageStep):
    """Raises KeyboardInterrupt at the n-th image of this process (simulates Ctrl-C mid-run)."""

    name = "interrupt"
    summary = "Interrupt after n images (test step)."
    workers = 1
    params = [Param("after", int, 2, "images processed before the interrupt")]
    seen = 0

    def process(self, item, ctx):
        if InterruptAfter.seen >= self.options.after:
            raise KeyboardInterrupt
        InterruptAfter.seen += 1
        return item.replace(tags={**item.tags, "seen": None})


class CountSubset(DatasetStep):
    """Set repeats of each subset to its image count and log it."""

    name = "countsubset"
    summary = "Repeats = images per subset (test step)."

    def run(self, items, ctx):
        counts = {}
        for it in items:
            counts[it.subset] = counts.get(it.subset, 0) + 1
        for name, n in counts.items():
            ctx.subset(name).repeats = n
            ctx.log(f"{name}: {n}")
        return items


TEST_STEPS = [InvertStep, TagStep, InterruptAfter, CountSubset]


class LoggingStep(ImageStep):
    """Logs one line per image (to check that log lines from worker processes reach the summary)."""

    name = "logline"
    summary = "Log a line per image (test step)."

    def process(self, item, ctx):
        ctx.log(f"saw {item.name}")
        return item


TEST_STEPS.append(LoggingStep)


class KillWorker(ImageStep):
    """Kills its own worker process with SIGKILL (what the OOM killer does): every time for images
    named in ``poison``, only the first time (a marker file in ``marks``) for names starting with
    ``once``, on every image with ``always``."""

    name = "killworker"
    summary = "kill -9 its worker on chosen images (test step)."
    params = [Param("poison", str, "", "comma-separated names that always kill"),
              Param("marks", str, "", "folder for the first-time markers of 'once*' images"),
              Param("always", bool, False, "kill on every image")]

    def process(self, item, ctx):
        import os
        import signal
        from pathlib import Path

        name = item.name
        if self.options.always or name in self.options.poison.split(","):
            os.kill(os.getpid(), signal.SIGKILL)
        if name.startswith("once"):
            mark = Path(self.options.marks) / name
            if not mark.exists():
                mark.touch()
                os.kill(os.getpid(), signal.SIGKILL)
        return item.replace(tags={**item.tags, "survived": None})


class KillNode(ImageStep):
    """Kills the Ray node it runs on (its raylet, with SIGKILL: the machine going away) the first
    time it meets an image on the node ``node_id`` (a marker file in ``marks``)."""

    name = "killnode"
    summary = "kill -9 the Ray node of its worker once (test step)."
    params = [Param("node_id", str, "", "the Ray node to kill"),
              Param("marks", str, "", "folder for the marker file")]

    def process(self, item, ctx):
        import os
        import signal
        from pathlib import Path

        import ray

        mark = Path(self.options.marks) / "killed"
        if ray.get_runtime_context().get_node_id() == self.options.node_id and not mark.exists():
            mark.touch()
            os.kill(os.getppid(), signal.SIGKILL)  # the raylet that started this worker
            os.kill(os.getpid(), signal.SIGKILL)
        return item.replace(tags={**item.tags, "survived": None})


class CountSetups(ImageStep):
    """Writes a file named after its process id in ``marks`` at each setup() (models load there)."""

    name = "countsetups"
    summary = "Record each setup's process (test step)."
    params = [Param("marks", str, "", "folder for one file per process that set the step up")]

    def setup(self, ctx):
        import os
        from pathlib import Path

        (Path(self.options.marks) / str(os.getpid())).write_text(str(ctx.step_name))

    def process(self, item, ctx):
        return item
