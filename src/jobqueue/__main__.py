"""python -m jobqueue [--host H] [--port P]: the server, as python src/main.py starts it."""

from jobqueue.server import main

main()
