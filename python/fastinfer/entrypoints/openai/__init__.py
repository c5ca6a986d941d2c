"""The OpenAI API's request and response shapes (protocol.py), for the batch-file reader and a server."""
