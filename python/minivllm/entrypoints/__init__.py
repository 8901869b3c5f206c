"""The online side: AsyncLLM, the OpenAI-compatible server and its request models, run-batch."""
