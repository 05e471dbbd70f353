"""The Hub stand-in answers the real huggingface_hub client the way the Hub does (plain files, in-process)."""

import http.client
from urllib.parse import urlsplit

import pytest
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from hub_standin import DEFAULT_TOKEN, HubStandIn, git_blob_sha1


@pytest.fixture(scope="module")
def hub():
    with HubStandIn() as stand_in:
        yield stand_in


@pytest.fixture
def api(hub):
    return HfApi(endpoint=hub.url, token=DEFAULT_TOKEN)


def head(url: str) -> http.client.HTTPResponse:
    """One HEAD request that does not follow redirects, to see exactly what the stand-in answers."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.netloc, timeout=10)
    connection.request("HEAD", parts.path)
    response = connection.getresponse()
    response.read()
    connection.close()
    return response


def download(hub, tmp_path, repo_id, filename, revision=None) -> bytes:
    path = hf_hub_download(repo_id, filename, revision=revision, endpoint=hub.url, cache_dir=tmp_path,
                           token=DEFAULT_TOKEN)
    with open(path, "rb") as f:
        return f.read()


def test_old_commits_keep_their_content_and_unchanged_files_make_no_commit(hub, api, tmp_path):
    api.create_repo("org/plain")
    first = api.upload_file(path_or_fileobj=b"one", path_in_repo="notes/a.txt", repo_id="org/plain")
    second = api.upload_file(path_or_fileobj=b"two", path_in_repo="notes/a.txt", repo_id="org/plain")
    again = api.upload_file(path_or_fileobj=b"two", path_in_repo="notes/a.txt", repo_id="org/plain")

    assert first.oid != second.oid == again.oid == api.model_info("org/plain").sha
    assert download(hub, tmp_path, "org/plain", "notes/a.txt", revision=first.oid) == b"one"
    assert download(hub, tmp_path, "org/plain", "notes/a.txt") == b"two"
    assert sorted(api.list_repo_files("org/plain")) == [".gitattributes", "notes/a.txt"]
    [info] = api.get_paths_info("org/plain", ["notes/a.txt"], revision=first.oid)
    assert info.blob_id == git_blob_sha1(b"one")


def test_download_headers_and_the_cdn_redirect_for_lfs_files(hub, api, tmp_path):
    api.create_repo("org/weights")
    api.upload_file(path_or_fileobj=b"\x00" * 64, path_in_repo="w.safetensors", repo_id="org/weights")
    commit = api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id="org/weights")

    small = head(f"{hub.url}/org/weights/resolve/main/config.json")
    assert small.status == 200
    assert small.getheader("X-Repo-Commit") == commit.oid
    assert small.getheader("ETag") == f'"{git_blob_sha1(b"{}")}"'
    assert small.getheader("Content-Length") == "2"
    large = head(f"{hub.url}/org/weights/resolve/{commit.oid}/w.safetensors")
    assert large.status == 302 and large.getheader("Location").startswith("http://localhost:")
    assert large.getheader("X-Repo-Commit") == commit.oid and large.getheader("X-Linked-Size") == "64"

    assert download(hub, tmp_path, "org/weights", "w.safetensors") == b"\x00" * 64
    cdn = [request for request in hub.state.requests if request[0] == "cdn"]
    assert cdn and all(method == "GET" and not carried_token for _, method, _, carried_token in cdn)


def test_errors_carry_the_codes_the_client_maps(hub, api, tmp_path):
    api.create_repo("org/errors")
    with pytest.raises(HfHubHTTPError, match="Invalid user token"):
        HfApi(endpoint=hub.url, token="hf_wrong").whoami()
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo("org/errors")
    assert conflict.value.response.status_code == 409
    with pytest.raises(RemoteEntryNotFoundError):
        download(hub, tmp_path, "org/errors", "missing.json")
    with pytest.raises(RevisionNotFoundError):
        download(hub, tmp_path, "org/errors", ".gitattributes", revision="no-such-branch")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/no-such-repo")

    api.create_repo("org/secret", private=True)
    assert api.model_info("org/secret").private
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url, token=False).model_info("org/secret")


def test_branches_and_pull_requests(hub, api, tmp_path):
    api.create_repo("org/refs")
    main = api.upload_file(path_or_fileobj=b"main", path_in_repo="a.txt", repo_id="org/refs")
    api.create_branch("org/refs", branch="dev")
    api.upload_file(path_or_fileobj=b"dev", path_in_repo="a.txt", repo_id="org/refs", revision="dev")
    pr = api.upload_file(path_or_fileobj=b"pr", path_in_repo="a.txt", repo_id="org/refs", create_pr=True)

    assert pr.pr_revision == "refs/pr/1" and pr.pr_url.endswith("/org/refs/discussions/1")
    assert download(hub, tmp_path, "org/refs", "a.txt", revision="dev") == b"dev"
    assert download(hub, tmp_path, "org/refs", "a.txt", revision=pr.pr_revision) == b"pr"
    assert download(hub, tmp_path, "org/refs", "a.txt") == b"main"
    refs = api.list_repo_refs("org/refs", include_pull_requests=True)
    assert {ref.name: ref.target_commit for ref in refs.branches}["main"] == main.oid
    assert [ref.name for ref in refs.pull_requests] == ["refs/pr/1"]
