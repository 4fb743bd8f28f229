"""The OpenAI-compatible API's pieces: request fields and their policy, response bodies, log-probability shaping.
The routes are in server/routes/openai.py."""
