# One image for the API, the worker and migrations:
#   docker run IMAGE migrate | serve --host 0.0.0.0 | worker | create-api-key --client NAME
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/smsgate
WORKDIR /src
# Exactly the locked versions (hashes checked), in a layer of their own that code changes reuse;
# then the project itself, built by the locked hatchling, adding no dependency of its own.
COPY requirements/runtime.txt ./requirements/
RUN /opt/smsgate/bin/pip install --require-hashes -r requirements/runtime.txt
COPY pyproject.toml README.md ./
COPY app ./app
RUN /opt/smsgate/bin/pip install --no-deps --no-build-isolation .

FROM python:3.11-slim
ENV PATH=/opt/smsgate/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
RUN useradd --system --uid 10001 --no-create-home smsgate
COPY --from=build /opt/smsgate /opt/smsgate
WORKDIR /srv/smsgate
# `smsgate migrate` finds alembic.ini (and through it migrations/) in the working directory.
COPY alembic.ini ./
COPY migrations ./migrations
USER smsgate
EXPOSE 8000
ENTRYPOINT ["smsgate"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
