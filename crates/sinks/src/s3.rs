//! S3 object upload for the `parquet` sink (`destination = "s3://bucket/prefix"`).
//!
//! An object is streamed: the encoder hands over parts of at least `part_size` (≥ 5 MiB, the S3
//! minimum) as they fill, each sent with `UploadPart`; the object only becomes visible when
//! `CompleteMultipartUpload` succeeds, which is when the sink acknowledges its records. An object
//! smaller than one part is sent with a single `PutObject`. Uploads left incomplete by a crash
//! are aborted on start-up once older than `cleanup_after` (or by a bucket lifecycle rule
//! `AbortIncompleteMultipartUpload`, recommended in production).
//!
//! Every request has a deadline (`connect_timeout`, `timeout` per attempt): a server that
//! accepts connections but never answers makes the request fail after the SDK's attempts
//! instead of stalling the sink. Each such failure is logged at WARN with the endpoint and
//! counted in the sink's `timeouts` metric; the file's records are `Errored` (redelivered).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use aws_config::BehaviorVersion;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::Region;
use aws_sdk_s3::error::SdkError;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    CompletedMultipartUpload, CompletedPart, ServerSideEncryption, StorageClass,
};
use aws_sdk_s3::Client;
use aws_smithy_http_client::tls;
use bytes::Bytes;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sluice_core::config::{ByteSize, HumanDuration};

/// The S3 minimum size of every part but the last.
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;

/// Server-side encryption of uploaded objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Sse {
    /// S3-managed keys (SSE-S3).
    #[serde(rename = "AES256")]
    Aes256,
    /// KMS keys (SSE-KMS); set `sse_kms_key_id` or the bucket's default key is used.
    #[serde(rename = "aws:kms")]
    Kms,
}

/// S3 connection and object options (`s3 = { region = "eu-west-1", … }`). Credentials come from
/// the standard AWS chain (environment, profile, SSO, web identity, ECS/EC2 metadata).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct S3Options {
    /// AWS region. Default: from the standard chain (`AWS_REGION`, profile…), else an error.
    #[serde(default)]
    pub region: Option<String>,
    /// Endpoint URL for S3-compatible stores (MinIO, moto, LocalStack). Default: AWS.
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// Address buckets as `endpoint/bucket/key` instead of `bucket.endpoint/key` (needed by most
    /// S3-compatible stores). Default false.
    #[serde(default)]
    pub force_path_style: bool,
    /// Storage class of new objects (`STANDARD`, `STANDARD_IA`, `INTELLIGENT_TIERING`,
    /// `GLACIER_IR`, …). Default: the bucket's default (STANDARD).
    #[serde(default)]
    pub storage_class: Option<String>,
    /// Server-side encryption: "AES256" or "aws:kms". Default: the bucket's default encryption.
    #[serde(default)]
    pub sse: Option<Sse>,
    /// KMS key id or ARN for `sse = "aws:kms"`. Default: the account's `aws/s3` key.
    #[serde(default)]
    pub sse_kms_key_id: Option<String>,
    /// Size of each multipart upload part; at least "5MiB". Memory per open object is about one
    /// part plus one row group. Default "8MiB".
    #[serde(default = "default_part_size")]
    pub part_size: ByteSize,
    /// Deadline of one request attempt (connect, send, answer): a server that stops
    /// answering fails the request after the SDK's 3 attempts instead of stalling the sink;
    /// the file's records are then `Errored` (redelivered), the timeout logged at WARN and
    /// counted in `timeouts`. Allow for uploading one `part_size` on the slowest link.
    /// Default "60s".
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
    /// Deadline for opening a connection. Default "10s".
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: HumanDuration,
}

fn default_part_size() -> ByteSize {
    ByteSize(8 * 1024 * 1024)
}
fn default_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}
fn default_connect_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}

impl Default for S3Options {
    fn default() -> Self {
        S3Options {
            region: None,
            endpoint_url: None,
            force_path_style: false,
            storage_class: None,
            sse: None,
            sse_kms_key_id: None,
            part_size: default_part_size(),
            timeout: default_timeout(),
            connect_timeout: default_connect_timeout(),
        }
    }
}

/// A bucket and key prefix to write objects under.
#[derive(Debug, Clone)]
pub struct Store {
    client: Client,
    bucket: String,
    prefix: String,
    options: Arc<S3Options>,
    /// Where requests go, for messages: the endpoint URL or the region's AWS host.
    endpoint: String,
    /// The sink's name and `timeouts` counter, set by [`Store::observe`] when it runs.
    observer: Arc<OnceLock<(String, Arc<AtomicI64>)>>,
}

/// Turns an SDK error into a message that includes the service's error code and message.
fn describe<E: std::error::Error + 'static>(what: &str, key: &str, e: &E) -> String {
    let mut msg = format!("S3 {what} of {key}: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

/// Whether a request failed because it ran out of time (attempt deadline or connect timeout).
fn is_timeout<E, R>(e: &SdkError<E, R>) -> bool {
    match e {
        SdkError::TimeoutError(_) => true,
        SdkError::DispatchFailure(d) => d.is_timeout(),
        _ => false,
    }
}

impl Store {
    /// Builds a client for `bucket` from the standard credential chain and `options`.
    pub async fn connect(bucket: &str, prefix: &str, options: &S3Options) -> Result<Self, String> {
        if options.part_size.0 < MIN_PART_SIZE {
            return Err(format!(
                "`s3.part_size` {} is below the S3 minimum of 5MiB",
                options.part_size
            ));
        }
        if options.sse_kms_key_id.is_some() && options.sse != Some(Sse::Kms) {
            return Err("`s3.sse_kms_key_id` needs `s3.sse = \"aws:kms\"`".into());
        }
        // rustls with ring: the same crypto as the rest of the workspace, no aws-lc C build.
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let mut loader = aws_config::defaults(BehaviorVersion::latest()).http_client(http);
        if let Some(region) = &options.region {
            loader = loader.region(Region::new(region.clone()));
        }
        let sdk = loader.load().await;
        if sdk.region().is_none() {
            return Err(
                "no AWS region: set `s3.region` or AWS_REGION (or a region in the AWS profile)"
                    .into(),
            );
        }
        if options.timeout.0.is_zero() || options.connect_timeout.0.is_zero() {
            return Err("`s3.timeout` and `s3.connect_timeout` must be above zero".into());
        }
        let mut config = aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(options.force_path_style)
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(options.connect_timeout.0)
                    .operation_attempt_timeout(options.timeout.0)
                    .build(),
            );
        // An empty value (`endpoint_url = "${VAR:-}"` with VAR unset) means "not set".
        let endpoint = match options.endpoint_url.as_deref().filter(|u| !u.is_empty()) {
            Some(url) => {
                config = config.endpoint_url(url);
                url.to_string()
            }
            None => format!(
                "https://s3.{}.amazonaws.com",
                sdk.region().map(|r| r.as_ref()).unwrap_or("?")
            ),
        };
        Ok(Store {
            client: Client::from_conf(config.build()),
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            options: Arc::new(options.clone()),
            endpoint,
            observer: Arc::default(),
        })
    }

    /// Names the sink in timeout warnings and counts timeouts in `timeouts` (the sink's
    /// metric); called once the sink runs. Later calls are ignored.
    pub fn observe(&self, sink: &str, timeouts: Arc<AtomicI64>) {
        let _ = self.observer.set((sink.to_string(), timeouts));
    }

    /// The message for a failed request; a timeout is also logged at WARN and counted.
    fn failed<E, R>(&self, what: &str, key: &str, e: SdkError<E, R>) -> String
    where
        E: std::error::Error + 'static,
        R: std::fmt::Debug + 'static,
    {
        let msg = describe(what, key, &e);
        if is_timeout(&e) {
            let sink = match self.observer.get() {
                Some((sink, timeouts)) => {
                    timeouts.fetch_add(1, Ordering::Relaxed);
                    sink.as_str()
                }
                None => "",
            };
            tracing::warn!(
                sink,
                endpoint = %self.endpoint,
                operation = what,
                timeout = %self.options.timeout,
                "S3 request to {} timed out: {msg}",
                self.endpoint
            );
        }
        msg
    }

    /// The full object key of `relative` (prefix + relative).
    pub fn key(&self, relative: &str) -> String {
        format!("{}{}", self.prefix, relative)
    }

    /// `s3://bucket/key`, for messages.
    pub fn url(&self, key: &str) -> String {
        format!("s3://{}/{}", self.bucket, key)
    }

    /// The configured part size in bytes.
    pub fn part_size(&self) -> usize {
        self.options.part_size.0 as usize
    }

    /// Checks that the bucket is reachable with the configured credentials.
    pub async fn check(&self) -> Result<(), String> {
        self.client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.failed("HeadBucket", &self.url(""), e))
    }

    /// Aborts multipart uploads under the prefix that were started more than `older_than` ago
    /// (left behind by a crash). Returns how many were aborted.
    pub async fn abort_stale_uploads(&self, older_than: Duration) -> Result<usize, String> {
        let cutoff = SystemTime::now()
            .checked_sub(older_than)
            .unwrap_or(SystemTime::UNIX_EPOCH)
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let mut aborted = 0;
        let mut key_marker: Option<String> = None;
        let mut id_marker: Option<String> = None;
        loop {
            let page = self
                .client
                .list_multipart_uploads()
                .bucket(&self.bucket)
                .prefix(&self.prefix)
                .set_key_marker(key_marker.take())
                .set_upload_id_marker(id_marker.take())
                .send()
                .await
                .map_err(|e| self.failed("ListMultipartUploads", &self.url(&self.prefix), e))?;
            for upload in page.uploads() {
                let (Some(key), Some(id)) = (upload.key(), upload.upload_id()) else {
                    continue;
                };
                let stale = upload.initiated().is_none_or(|t| t.secs() < cutoff);
                if stale {
                    self.client
                        .abort_multipart_upload()
                        .bucket(&self.bucket)
                        .key(key)
                        .upload_id(id)
                        .send()
                        .await
                        .map_err(|e| self.failed("AbortMultipartUpload", key, e))?;
                    aborted += 1;
                }
            }
            if page.is_truncated() != Some(true) {
                break;
            }
            key_marker = page.next_key_marker().map(str::to_string);
            id_marker = page.next_upload_id_marker().map(str::to_string);
            if key_marker.is_none() && id_marker.is_none() {
                break;
            }
        }
        Ok(aborted)
    }

    /// Starts an object upload to `key` (nothing is sent until the first part is full).
    pub fn upload(&self, key: String) -> Upload {
        Upload {
            store: self.clone(),
            key,
            upload_id: None,
            parts: Vec::new(),
        }
    }
}

/// One object being uploaded. Invisible until [`Upload::complete`] returns.
#[derive(Debug)]
pub struct Upload {
    store: Store,
    key: String,
    upload_id: Option<String>,
    parts: Vec<CompletedPart>,
}

impl Upload {
    /// The object's key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Parts uploaded so far.
    pub fn parts(&self) -> usize {
        self.parts.len()
    }

    async fn start(&mut self) -> Result<String, String> {
        if let Some(id) = &self.upload_id {
            return Ok(id.clone());
        }
        let s = &self.store;
        let out = s
            .client
            .create_multipart_upload()
            .bucket(&s.bucket)
            .key(&self.key)
            .set_storage_class(s.options.storage_class.as_deref().map(StorageClass::from))
            .set_server_side_encryption(s.options.sse.map(sse_value))
            .set_ssekms_key_id(s.options.sse_kms_key_id.clone())
            .send()
            .await
            .map_err(|e| s.failed("CreateMultipartUpload", &self.key, e))?;
        let id = out
            .upload_id()
            .ok_or_else(|| {
                format!(
                    "S3 CreateMultipartUpload of {} returned no upload id",
                    self.key
                )
            })?
            .to_string();
        self.upload_id = Some(id.clone());
        Ok(id)
    }

    /// Uploads the next part (every part but the last must be at least 5 MiB).
    pub async fn write_part(&mut self, data: Bytes) -> Result<(), String> {
        let id = self.start().await?;
        let number = self.parts.len() as i32 + 1;
        let s = &self.store;
        let out = s
            .client
            .upload_part()
            .bucket(&s.bucket)
            .key(&self.key)
            .upload_id(id)
            .part_number(number)
            .body(ByteStream::from(data))
            .send()
            .await
            .map_err(|e| s.failed("UploadPart", &self.key, e))?;
        self.parts.push(
            CompletedPart::builder()
                .set_e_tag(out.e_tag().map(str::to_string))
                .part_number(number)
                .build(),
        );
        Ok(())
    }

    /// Sends `tail` and makes the object visible. On error the upload is aborted.
    pub async fn complete(mut self, tail: Bytes) -> Result<(), String> {
        let result = self.try_complete(tail).await;
        if result.is_err() {
            self.abort().await;
        }
        result
    }

    async fn try_complete(&mut self, tail: Bytes) -> Result<(), String> {
        let s = self.store.clone();
        if self.upload_id.is_none() {
            s.client
                .put_object()
                .bucket(&s.bucket)
                .key(&self.key)
                .set_storage_class(s.options.storage_class.as_deref().map(StorageClass::from))
                .set_server_side_encryption(s.options.sse.map(sse_value))
                .set_ssekms_key_id(s.options.sse_kms_key_id.clone())
                .body(ByteStream::from(tail))
                .send()
                .await
                .map_err(|e| s.failed("PutObject", &self.key, e))?;
            return Ok(());
        }
        if !tail.is_empty() {
            self.write_part(tail).await?;
        }
        let id = self.upload_id.clone().unwrap_or_default();
        s.client
            .complete_multipart_upload()
            .bucket(&s.bucket)
            .key(&self.key)
            .upload_id(id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(std::mem::take(&mut self.parts)))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| s.failed("CompleteMultipartUpload", &self.key, e))?;
        self.upload_id = None;
        Ok(())
    }

    /// Abandons the object: aborts the multipart upload if one was started (best effort; a
    /// failure is logged and left to start-up cleanup or the bucket's lifecycle rule).
    pub async fn abort(&mut self) {
        let Some(id) = self.upload_id.take() else {
            return;
        };
        let s = &self.store;
        if let Err(e) = s
            .client
            .abort_multipart_upload()
            .bucket(&s.bucket)
            .key(&self.key)
            .upload_id(id)
            .send()
            .await
        {
            let error = s.failed("AbortMultipartUpload", &self.key, e);
            tracing::warn!(key = %self.key, %error, "left an incomplete multipart upload");
        }
    }
}

fn sse_value(sse: Sse) -> ServerSideEncryption {
    match sse {
        Sse::Aes256 => ServerSideEncryption::Aes256,
        Sse::Kms => ServerSideEncryption::AwsKms,
    }
}
