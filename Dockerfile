# One image for the worker, Flower and the one-shot producer.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY producer ./producer
RUN pip install --no-cache-dir '.[local,flower]'
RUN useradd --create-home celebscan
USER celebscan
CMD ["celery", "-A", "worker.celery_app", "worker", "--loglevel", "INFO"]
