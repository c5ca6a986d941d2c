"""What users and programs call: the `LLM` class (llm.py), the `fastinfer` command (cli/) and the OpenAI request and
response shapes (openai/protocol.py) shared by the batch-file reader and a server. The engine (fastinfer/engine/)
knows nothing of them."""
