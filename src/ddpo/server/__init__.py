"""HTTP servers: the reward server (`ddpo serve-reward`: `reward_server.py`, wire format in `protocol.py`) and
the labelling web app (`ddpo label serve`: `label_app.py`)."""
