"""Runs in the notebook kernel (or a script, or a worker calling another function): the
connection to the server, registration, `Endpoint` and `Function` handles, the calls
WebSocket, the magics, progress bars and endpoint cards. Never imports `server`."""
