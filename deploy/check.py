"""The checks of `bash deploy/check` (which installs what they need and runs this file).

`python3 check.py DIR --promtool PATH` checks the deploy directory DIR:

- every YAML and JSON file parses;
- the alert rules: `promtool check rules` (PromQL syntax, templates) and `promtool test rules`
  on prometheus/alerts.test.yml (alerts fire when and as they should);
- the compose Prometheus configuration: `promtool check config --syntax-only`; every job an
  alert selects (`job="…"`, `job=~"…"`) is a job that configuration and kubernetes/monitoring.yaml
  scrape under that name;
- the Grafana dashboard: every `$variable` a query uses is defined, and every query parses as
  PromQL (`promtool check rules` on a rule file made of them);
- every KEDA ScaledObject validates against schemas/keda-scaledobject.schema.json, its
  minReplicaCount is not above its maxReplicaCount, its scaleTargetRef names a Deployment here,
  and every `…FromEnv` of its triggers is set in that Deployment's container;
- every Secret key a manifest reads (env `secretKeyRef`, `envFrom.secretRef`, secret volumes and
  their `items`) is created by a `kubectl create secret` command in README.md, unless the
  reference is `optional: true`; an env value naming a file under a secret volume's mount path
  names a file that volume provides;
- the systemd units pass `systemd-analyze verify` (where it exists) and load every credential
  (`%d/<name>`) they name.

`python3 check.py DIR --promtool PATH --self-test` then copies DIR, breaks one thing at a time in
the copy (a secret key, a PromQL expression, a ScaledObject field, …), and fails unless the
checks pass on the unbroken copy and catch each break with its own message.
"""

import argparse
import json
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

import jsonschema
import yaml


def rel(root, path):
    return str(pathlib.Path(path).relative_to(root))


# --- every file parses ---------------------------------------------------------------------


def parse_all(root, say):
    errors = []
    for path in sorted(root.rglob("*")):
        try:
            if path.suffix in (".yaml", ".yml"):
                list(yaml.safe_load_all(path.read_text()))
            elif path.suffix == ".json":
                json.loads(path.read_text())
            else:
                continue
            say(f"{rel(root, path)} parses")
        except Exception as e:  # noqa: BLE001 - any parse error is the finding
            errors.append(f"{rel(root, path)}: does not parse: {e}")
    return errors


def load_all(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]


# --- promtool ------------------------------------------------------------------------------


def promtool(tool, *args, cwd):
    """promtool's exit code, and what it said less its banner, blank and repeated lines."""
    run = subprocess.run([tool, *args], cwd=cwd, capture_output=True, text=True, check=False)
    lines = []
    for line in (run.stdout + run.stderr).splitlines():
        if line.strip() and not line.startswith(("Checking ", "Unit Testing:")) and line not in lines:
            lines.append(line.rstrip())
    return run.returncode, "\n".join(lines)


def alert_rules(root, tool, say):
    errors = []
    code, out = promtool(tool, "check", "rules", "alerts.yml", cwd=root / "prometheus")
    if code:
        # The unit tests would only repeat it.
        return [f"prometheus/alerts.yml: promtool check rules failed:\n{indent(out)}"]
    say("prometheus/alerts.yml: promtool check rules passes")
    code, out = promtool(tool, "test", "rules", "alerts.test.yml", cwd=root / "prometheus")
    if code:
        errors.append(
            f"prometheus/alerts.test.yml: promtool test rules failed:\n{indent(out)}"
        )
    else:
        say("prometheus/alerts.test.yml: promtool test rules passes")
    return errors


def indent(text):
    return "\n".join("    " + line for line in text.splitlines())


# --- scrape jobs ---------------------------------------------------------------------------


def scrape_jobs(root, tool, say):
    errors = []
    config = root / "compose/prometheus/prometheus.yml"
    code, out = promtool(tool, "check", "config", "--syntax-only", config.name, cwd=config.parent)
    if code:
        errors.append(f"{rel(root, config)}: promtool check config failed:\n{indent(out)}")
    else:
        say(f"{rel(root, config)}: promtool check config passes")
    compose_jobs = {c["job_name"] for c in yaml.safe_load(config.read_text())["scrape_configs"]}
    monitor_jobs = set()
    for doc in load_all(root / "kubernetes/monitoring.yaml"):
        for endpoint in doc.get("spec", {}).get("podMetricsEndpoints", []):
            for relabel in endpoint.get("relabelings", []):
                if relabel.get("targetLabel") == "job" and "replacement" in relabel:
                    monitor_jobs.add(relabel["replacement"])
    text = (root / "prometheus/alerts.yml").read_text()
    selected = re.findall(r'\bjob\s*(=~|=)\s*"([^"]*)"', text)
    for op, value in sorted(set(selected)):
        for where, jobs in (
            ("compose/prometheus/prometheus.yml", compose_jobs),
            ("kubernetes/monitoring.yaml", monitor_jobs),
        ):
            if op == "=" and value not in jobs:
                errors.append(
                    f'prometheus/alerts.yml: selects job="{value}", which {where} does not '
                    f"scrape under that name (its jobs: {', '.join(sorted(jobs))})"
                )
            if op == "=~" and not any(re.fullmatch(value, j) for j in jobs):
                errors.append(
                    f'prometheus/alerts.yml: selects job=~"{value}", which matches no job of '
                    f"{where} (its jobs: {', '.join(sorted(jobs))})"
                )
    if not errors:
        say(f"prometheus/alerts.yml: its {len(set(selected))} job selectors match the scrape jobs")
    return errors


# --- Grafana dashboard ---------------------------------------------------------------------

GRAFANA_INTERVALS = {"__rate_interval", "__interval", "__range"}


def dashboard(root, tool, say):
    errors = []
    path = root / "grafana/wa-sender.json"
    board = json.loads(path.read_text())
    defined = {v["name"] for v in board.get("templating", {}).get("list", [])}
    rules = []
    for panel in board.get("panels", []):
        for target in panel.get("targets", []):
            expr = target.get("expr")
            if not expr:
                continue
            where = f"panel {panel.get('id')} ({panel.get('title')}), query {target.get('refId')}"
            for name in re.findall(r"\$\{?(\w+)", expr):
                if name not in defined and not name.startswith("__"):
                    errors.append(
                        f"{rel(root, path)}: {where} uses ${name}, which is not a template "
                        f"variable (defined: {', '.join(sorted(defined))})"
                    )

            def value(m):
                return "5m" if m.group(1) in GRAFANA_INTERVALS else ".*"

            promql = re.sub(r"\$\{?(\w+)\}?", value, expr)
            record = f"grafana:panel_{panel.get('id')}_{target.get('refId')}"
            rules.append({"record": record, "expr": promql})
    with tempfile.TemporaryDirectory() as tmp:
        file = pathlib.Path(tmp) / "dashboard-queries.yml"
        file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
        code, out = promtool(tool, "check", "rules", file.name, cwd=tmp)
    if code:
        errors.append(
            f"{rel(root, path)}: a query is not valid PromQL (promtool, rules named "
            f"grafana:panel_<id>_<refId>):\n{indent(out)}"
        )
    if not errors:
        say(f"{rel(root, path)}: its {len(rules)} queries parse and use only defined variables")
    return errors


# --- KEDA ScaledObject ---------------------------------------------------------------------


def dotted(path):
    return ".".join(str(p) for p in path) or "(the document)"


def scaled_objects(root, say):
    errors = []
    schema = json.loads((root / "schemas/keda-scaledobject.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    docs = {}
    for path in sorted((root / "kubernetes").glob("*.yaml")):
        for doc in load_all(path):
            docs.setdefault((doc.get("kind"), doc.get("metadata", {}).get("name")), (path, doc))
    checked = 0
    for (kind, name), (path, doc) in docs.items():
        if kind != "ScaledObject":
            continue
        checked += 1
        where = f"{rel(root, path)}: ScaledObject {name}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
            errors.append(f"{where}: {dotted(e.absolute_path)}: {e.message}")
        spec = doc.get("spec") if isinstance(doc.get("spec"), dict) else {}
        low, high = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
        if isinstance(low, int) and isinstance(high, int) and low > high:
            errors.append(f"{where}: minReplicaCount {low} is above maxReplicaCount {high}")
        ref = spec.get("scaleTargetRef") or {}
        target_kind = ref.get("kind", "Deployment")
        target = docs.get((target_kind, ref.get("name")))
        if target is None:
            errors.append(
                f"{where}: scaleTargetRef names {target_kind} {ref.get('name')}, which no "
                "manifest in kubernetes/ defines"
            )
            continue
        containers = target[1]["spec"]["template"]["spec"]["containers"]
        wanted = ref.get("envSourceContainerName")
        container = next((c for c in containers if c["name"] == wanted), None) if wanted else containers[0]
        if container is None:
            errors.append(f"{where}: envSourceContainerName {wanted} is no container of {ref['name']}")
            continue
        env = {e["name"] for e in container.get("env", [])}
        for trigger in spec.get("triggers") or []:
            for key, var in (trigger.get("metadata") or {}).items():
                if key.endswith("FromEnv") and var not in env and not container.get("envFrom"):
                    errors.append(
                        f"{where}: trigger {trigger.get('type')}: {key} {var} is not set in "
                        f"container {container['name']} of {target_kind} {ref['name']} "
                        f"({rel(root, target[0])}), where KEDA reads it"
                    )
    if checked == 0:
        errors.append("kubernetes/: no ScaledObject found to validate")
    if not errors:
        say(f"kubernetes/: {checked} ScaledObject(s) valid against schemas/keda-scaledobject.schema.json")
    return errors


# --- Secret keys ---------------------------------------------------------------------------


def documented_secrets(readme):
    """{secret name: (keys, line)} from every `kubectl create secret` command in `readme`."""
    lines = readme.read_text().splitlines()
    secrets, problems = {}, []
    i = 0
    while i < len(lines):
        line = lines[i]
        at = line.find("kubectl create secret ")
        if at < 0:
            i += 1
            continue
        start = i + 1
        command = line[at:]
        while command.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            command = command.rstrip()[:-1] + " " + lines[i]
        i += 1
        try:
            words = shlex.split(command, comments=True)
        except ValueError:
            continue  # prose mentioning the command, not a command
        if len(words) < 5 or words[2] != "secret" or words[3] not in ("generic", "tls"):
            continue
        kind, name, options = words[3], words[4], words[5:]
        keys = set(secrets.get(name, (set(), start))[0])
        if kind == "tls":
            keys |= {"tls.crt", "tls.key"}
        j = 0
        while j < len(options):
            option = options[j]
            flag, _, value = option.partition("=")
            if flag in ("--from-literal", "--from-file", "--from-env-file") and not value:
                j += 1
                value = options[j] if j < len(options) else ""
            if flag == "--from-literal":
                keys.add(value.split("=", 1)[0])
            elif flag == "--from-file":
                keys.add(value.split("=", 1)[0] if "=" in value else pathlib.Path(value).name)
            elif flag == "--from-env-file":
                problems.append(
                    f"README.md line {start}: secret {name} is made --from-env-file, whose keys "
                    "deploy/check cannot see: use --from-literal or --from-file"
                )
            j += 1
        secrets[name] = (keys, secrets.get(name, (None, start))[1])
    return secrets, problems


def pod_specs(node):
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list):
            yield node
        for value in node.values():
            yield from pod_specs(value)
    elif isinstance(node, list):
        for value in node:
            yield from pod_specs(value)


def secret_keys(root, say):
    secrets, errors = documented_secrets(root / "README.md")
    if not secrets:
        return ["README.md: no `kubectl create secret` command found"]
    checked = 0

    def need(where, secret, key, optional):
        nonlocal checked
        checked += 1
        if secret not in secrets:
            if not optional:
                errors.append(
                    f"{where} reads Secret {secret}, which no `kubectl create secret ... "
                    f"{secret}` command in README.md creates (documented: "
                    f"{', '.join(sorted(secrets))}); add one, or mark the reference optional: true"
                )
        elif key is not None and key not in secrets[secret][0] and not optional:
            errors.append(
                f"{where} reads key {key} of Secret {secret}, which the command creating it "
                f"(README.md line {secrets[secret][1]}) does not create (it creates: "
                f"{', '.join(sorted(secrets[secret][0]))}); add --from-literal={key}=… or "
                f"--from-file={key}=… to it, or mark the reference optional: true"
            )

    for path in sorted((root / "kubernetes").glob("*.yaml")):
        for doc in load_all(path):
            owner = f"{rel(root, path)}: {doc.get('kind')} {doc.get('metadata', {}).get('name')}"
            for pod in pod_specs(doc):
                volumes = {v.get("name"): v for v in pod.get("volumes") or []}
                for vname, volume in volumes.items():
                    sources = []
                    if "secret" in volume:
                        s = volume["secret"]
                        sources.append((s.get("secretName"), s.get("items"), s.get("optional")))
                    for source in (volume.get("projected") or {}).get("sources") or []:
                        if "secret" in source:
                            s = source["secret"]
                            sources.append((s.get("name"), s.get("items"), s.get("optional")))
                    for secret, items, optional in sources:
                        where = f"{owner}: volume {vname}"
                        need(where, secret, None, optional)
                        for item in items or []:
                            need(f"{where}, item {item.get('path')}", secret, item.get("key"), optional)
                for container in (pod.get("initContainers") or []) + pod["containers"]:
                    cwhere = f"{owner}: container {container.get('name')}"
                    for env in container.get("env") or []:
                        ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                        if ref:
                            need(f"{cwhere}: env {env.get('name')}", ref.get("name"), ref.get("key"), ref.get("optional"))
                    for source in container.get("envFrom") or []:
                        ref = source.get("secretRef")
                        if ref:
                            need(f"{cwhere}: envFrom", ref.get("name"), None, ref.get("optional"))
                    errors.extend(files_in_mounts(cwhere, container, volumes, secrets))
    if not errors:
        say(f"kubernetes/: all {checked} Secret references are created by README.md's `kubectl create secret` commands")
    return errors


def files_in_mounts(where, container, volumes, secrets):
    """An env value naming a file under a secret volume's mount names a file it provides."""
    errors = []
    for mount in container.get("volumeMounts") or []:
        volume = volumes.get(mount.get("name")) or {}
        if "secret" not in volume:
            continue
        secret = volume["secret"].get("secretName")
        items = volume["secret"].get("items")
        provided = (
            {item.get("path") for item in items}
            if items
            else set(secrets.get(secret, (set(), 0))[0])
        )
        prefix = mount["mountPath"].rstrip("/") + "/"
        for env in container.get("env") or []:
            value = env.get("value")
            if isinstance(value, str) and value.startswith(prefix):
                file = value[len(prefix):]
                if file not in provided:
                    errors.append(
                        f"{where}: env {env.get('name')} names {value}, which volume "
                        f"{mount.get('name')} (Secret {secret}) does not provide (it has: "
                        f"{', '.join(sorted(provided)) or 'nothing'})"
                    )
    return errors


# --- systemd units ------------------------------------------------------------------------


def systemd_units(root, say):
    """`systemd-analyze verify` on each unit (its ExecStart binary swapped for /usr/bin/true, as
    wa-sender is not installed here), and every %d/<name> credential it names is loaded."""
    units = sorted((root / "systemd").glob("*.service"))
    errors = []
    for unit in units:
        text = unit.read_text()
        loaded = set(re.findall(r"^LoadCredential=([^:\s]+):", text, re.M))
        for name in sorted(set(re.findall(r"%d/([\w.-]+)", text)) - loaded):
            errors.append(
                f"{rel(root, unit)}: names the credential %d/{name}, which no "
                f"LoadCredential={name}:… line loads (it loads: {', '.join(sorted(loaded)) or 'none'})"
            )
    tool = shutil.which("systemd-analyze")
    if tool is None:
        say("systemd/: systemd-analyze not found, the units' syntax is not checked")
        return errors
    with tempfile.TemporaryDirectory() as tmp:
        copies = []
        for unit in units:
            copy = pathlib.Path(tmp) / unit.name
            copy.write_text(
                re.sub(r"^ExecStart=\S+", "ExecStart=/usr/bin/true", unit.read_text(), flags=re.M)
            )
            copies.append(str(copy))
        run = subprocess.run(
            [tool, "verify", "--man=no", *copies], capture_output=True, text=True, check=False
        )
        out = (run.stdout + run.stderr).replace(tmp + "/", "systemd/").strip()
    if run.returncode or out:
        errors.append(f"systemd/: systemd-analyze verify found:\n{indent(out)}")
    if not errors:
        say(f"systemd/: {len(units)} units pass systemd-analyze verify and load every credential they name")
    return errors


# --- all of them ---------------------------------------------------------------------------


def check(root, tool, say=lambda _: None):
    errors = parse_all(root, say)
    if errors:
        return errors
    for one in (
        lambda: alert_rules(root, tool, say),
        lambda: scrape_jobs(root, tool, say),
        lambda: dashboard(root, tool, say),
        lambda: scaled_objects(root, say),
        lambda: secret_keys(root, say),
        lambda: systemd_units(root, say),
    ):
        errors.extend(one())
    return errors


# --- self-test -----------------------------------------------------------------------------

# (what is broken, file, text, replacement, what the error must say[, the tool it needs])
BREAKS = [
    (
        "a secretKeyRef key renamed",
        "kubernetes/worker.yaml",
        "{name: wa-sender-connections, key: redis-url}",
        "{name: wa-sender-connections, key: redis-uri}",
        "kubernetes/worker.yaml: Deployment wa-sender-worker: container worker: env "
        "WA_SENDER__REDIS__URL reads key redis-uri of Secret wa-sender-connections",
    ),
    (
        "a key missing from the documented secret command",
        "README.md",
        "--from-file=admin-token=./admin-token",
        "--from-file=token=./admin-token",
        "kubernetes/admin.yaml: Deployment wa-sender-admin: container admin: env "
        "WA_SENDER__ADMIN__TOKEN reads key admin-token of Secret wa-sender-admin",
    ),
    (
        "a secret volume item renamed",
        "kubernetes/webhook.yaml",
        "- key: verify-token",
        "- key: verify_token",
        "kubernetes/webhook.yaml: Deployment wa-sender-webhook: volume webhook-secrets, item "
        "verify-token reads key verify_token of Secret wa-sender-webhook",
    ),
    (
        "a _FILE variable naming a file the secret volume lacks",
        "kubernetes/webhook.yaml",
        "value: /var/run/secrets/wa-sender/app-secret",
        "value: /var/run/secrets/wa-sender/app_secret",
        "env WA_SENDER__WEBHOOK__APP_SECRET_FILE names /var/run/secrets/wa-sender/app_secret",
    ),
    (
        "a broken PromQL expression in an alert",
        "prometheus/alerts.yml",
        "expr: max(wa_halts_in_force) > 0",
        "expr: max(wa_halts_in_force > 0",
        "prometheus/alerts.yml: promtool check rules failed",
    ),
    (
        "an alert that no longer fires as its unit test expects",
        "prometheus/alerts.yml",
        'expr: up{job=~"wa-sender-(worker|webhook|admin)"} == 0',
        'expr: up{job=~"wa-sender-(worker|webhook|admin)"} < 0',
        "prometheus/alerts.test.yml: promtool test rules failed",
    ),
    (
        "an alert selecting a job nothing scrapes",
        "compose/prometheus/prometheus.yml",
        "job_name: wa-sender-webhook",
        "job_name: wa-sender-webhooks",
        'selects job="wa-sender-webhook", which compose/prometheus/prometheus.yml does not scrape',
    ),
    (
        "a misspelt ScaledObject field",
        "kubernetes/worker.yaml",
        "\n  triggers:\n",
        "\n  triggerz:\n",
        "ScaledObject wa-sender-worker: spec: Additional properties are not allowed ('triggerz' was unexpected)",
    ),
    (
        "a ScaledObject field of the wrong type",
        "kubernetes/worker.yaml",
        "minReplicaCount: 2 ",
        'minReplicaCount: "2" ',
        "ScaledObject wa-sender-worker: spec.minReplicaCount: '2' is not of type 'integer'",
    ),
    (
        "a misspelt rabbitmq trigger setting",
        "kubernetes/worker.yaml",
        "queueName: '^wa\\.send\\.[0-9]+\\.otp$'",
        "queueNmae: '^wa\\.send\\.[0-9]+\\.otp$'",
        "('queueNmae' was unexpected)",
    ),
    (
        "hostFromEnv naming a variable the worker container lacks",
        "kubernetes/worker.yaml",
        "- name: RABBITMQ_MANAGEMENT_URL",
        "- name: RABBITMQ_URL",
        "hostFromEnv RABBITMQ_MANAGEMENT_URL is not set in container worker",
    ),
    (
        "a dashboard query using an undefined variable",
        "grafana/wa-sender.json",
        'wa_sends_total{phone_number_id=~\\"$number\\"}',
        'wa_sends_total{phone_number_id=~\\"$numbr\\"}',
        "uses $numbr, which is not a template variable",
    ),
    (
        "a dashboard query that is not PromQL",
        "grafana/wa-sender.json",
        "sum by (reason) (increase(wa_dead_letters_total[15m]))",
        "sum by (reason) (increase(wa_dead_letters_total[15m])",
        "grafana/wa-sender.json: a query is not valid PromQL",
    ),
    (
        "a systemd unit setting misspelt",
        "systemd/wa-sender-admin.service",
        "KillMode=mixed",
        "KillMode=mixd",
        "systemd/wa-sender-admin.service:",
        "systemd-analyze",
    ),
    (
        "a systemd credential used but not loaded",
        "systemd/wa-sender-webhook.service",
        "LoadCredential=verify-token:",
        "LoadCredential=verify_token:",
        "systemd/wa-sender-webhook.service: names the credential %d/verify-token",
    ),
]


def self_test(root, tool):
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        copy = pathlib.Path(tmp) / "deploy"
        shutil.copytree(root, copy, ignore=shutil.ignore_patterns("__pycache__"))
        errors = check(copy, tool)
        if errors:
            failures.append("the unbroken copy does not pass:\n" + "\n".join(errors))
        else:
            print("deploy: self-test: the unbroken copy passes")
        for what, file, old, new, expected, *needs in BREAKS:
            if needs and shutil.which(needs[0]) is None:
                print(f"deploy: self-test: {what}: skipped, no {needs[0]} here")
                continue
            path = copy / file
            text = path.read_text()
            if text.count(old) != 1:
                failures.append(
                    f"{what}: {file} holds {old!r} {text.count(old)} times, not once: update "
                    "the self-test (check.py, BREAKS) with the files"
                )
                continue
            path.write_text(text.replace(old, new))
            errors = check(copy, tool)
            path.write_text(text)
            caught = [e for e in errors if expected in e]
            if caught:
                # The message, and for promtool's its first finding.
                lines = [l.strip() for l in caught[0].splitlines() if l.strip() != "FAILED:"]
                shown = " ".join(lines[:2])
                print(f"deploy: self-test: {what}: caught: {shown}")
            else:
                failures.append(
                    f"{what}: not caught with {expected!r}; the errors were:\n"
                    + ("\n".join(errors) or "    (none)")
                )
    for failure in failures:
        print(f"deploy: self-test FAILED: {failure}", file=sys.stderr)
    return not failures


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=pathlib.Path)
    parser.add_argument("--promtool", required=True)
    parser.add_argument("--self-test", action="store_true")
    args = parser.parse_args()
    root = args.dir.resolve()
    if args.self_test:
        sys.exit(0 if self_test(root, args.promtool) else 1)
    errors = check(root, args.promtool, say=lambda line: print(f"deploy: {line}"))
    for error in errors:
        print(f"deploy: {error}", file=sys.stderr)
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
