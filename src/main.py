"""Start the jobqueue server: python src/main.py [--host H] [--port P] (= python -m jobqueue)."""

from jobqueue.server import main

if __name__ == "__main__":
    main()
