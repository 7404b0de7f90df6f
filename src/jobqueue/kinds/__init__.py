"""The registry of job kinds, keyed by `jobType`.

A new kind is one module in this package (options, handler, `KIND`) plus one entry below.
"""

from jobqueue.jobs import JobKind
from jobqueue.kinds import message, pdf2image, video

KINDS: dict[str, JobKind] = {
    kind.name: kind
    for kind in (
        message.KIND,
        pdf2image.KIND,
        video.KIND,
    )
}
