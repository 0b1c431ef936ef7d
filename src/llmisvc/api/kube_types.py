"""Kubernetes core and Gateway API types used inside an LLMInferenceService spec.

Field names and nesting follow Kubernetes core/v1 (PodSpec and what it contains,
PersistentVolumeClaimSpec), autoscaling/v2 (HorizontalPodAutoscalerBehavior), Gateway API
v1 (HTTPRouteSpec, ParentReference) and Gateway API Inference Extension (InferencePoolSpec),
as served by KServe v0.20's LLMInferenceService CRD. Inner structure is validated by type.
The semantic rules of these types (selector operators, most field formats) are left to the
Kubernetes API server. `rules.py` checks the few that llmisvc depends on, such as one volume
source per volume and one handler per probe.
"""

from __future__ import annotations

from llmisvc.api.schema import (
    Bool, Int, Int64, IntOrStr, Labels, Quantity, Str, Strs, array, obj, string_map,
)

ObjectMeta = obj(
    "ObjectMeta",
    "Standard Kubernetes object metadata.",
    annotations=Labels.doc("Annotations; on an LLMInferenceService, `llmisvc.io/engine` picks the "
                           "engine and `serving.kserve.io/stop: \"true\"` stops the service."),
    creationTimestamp=Str,
    deletionGracePeriodSeconds=Int64,
    deletionTimestamp=Str,
    finalizers=Strs,
    generateName=Str,
    generation=Int64,
    labels=Labels,
    managedFields=array(obj("ManagedFieldsEntry", open_fields=True)),
    name=Str.doc("Object name; a DNS-1123 label (lowercase alphanumerics and '-', at most 63)."),
    namespace=Str.doc("Namespace; `default` when absent."),
    ownerReferences=array(obj("OwnerReference", open_fields=True)),
    resourceVersion=Str,
    selfLink=Str,
    uid=Str,
)

# --- references and selectors -------------------------------------------------------------

LocalObjectReference = obj("LocalObjectReference", name=Str.defaulting("").doc("Name of the referent."))
KeyToPath = obj("KeyToPath", required=("key", "path"), key=Str, mode=Int, path=Str)
LabelSelectorRequirement = obj(
    "LabelSelectorRequirement", required=("key", "operator"), key=Str, operator=Str, values=Strs,
)
LabelSelector = obj(
    "LabelSelector", matchExpressions=array(LabelSelectorRequirement), matchLabels=Labels,
)
NodeSelectorRequirement = obj(
    "NodeSelectorRequirement", required=("key", "operator"), key=Str, operator=Str, values=Strs,
)
NodeSelectorTerm = obj(
    "NodeSelectorTerm",
    matchExpressions=array(NodeSelectorRequirement),
    matchFields=array(NodeSelectorRequirement),
)
ObjectFieldSelector = obj("ObjectFieldSelector", required=("fieldPath",), apiVersion=Str, fieldPath=Str)
ResourceFieldSelector = obj(
    "ResourceFieldSelector", required=("resource",), containerName=Str, divisor=Quantity, resource=Str,
)
ResourceList = string_map(Quantity)

# --- affinity -----------------------------------------------------------------------------

PodAffinityTerm = obj(
    "PodAffinityTerm",
    required=("topologyKey",),
    labelSelector=LabelSelector,
    matchLabelKeys=Strs,
    mismatchLabelKeys=Strs,
    namespaceSelector=LabelSelector,
    namespaces=Strs,
    topologyKey=Str,
)
WeightedPodAffinityTerm = obj(
    "WeightedPodAffinityTerm", required=("podAffinityTerm", "weight"), podAffinityTerm=PodAffinityTerm, weight=Int,
)
PodAffinity = obj(
    "PodAffinity",
    preferredDuringSchedulingIgnoredDuringExecution=array(WeightedPodAffinityTerm),
    requiredDuringSchedulingIgnoredDuringExecution=array(PodAffinityTerm),
)
Affinity = obj(
    "Affinity",
    "Node, pod and pod-anti affinity scheduling constraints (Kubernetes only).",
    nodeAffinity=obj(
        "NodeAffinity",
        preferredDuringSchedulingIgnoredDuringExecution=array(obj(
            "PreferredSchedulingTerm", required=("preference", "weight"), preference=NodeSelectorTerm, weight=Int,
        )),
        requiredDuringSchedulingIgnoredDuringExecution=obj(
            "NodeSelector", required=("nodeSelectorTerms",), nodeSelectorTerms=array(NodeSelectorTerm),
        ),
    ),
    podAffinity=PodAffinity,
    podAntiAffinity=PodAffinity.named("PodAntiAffinity"),
)

# --- containers ---------------------------------------------------------------------------

EnvVarSource = obj(
    "EnvVarSource",
    configMapKeyRef=obj("ConfigMapKeySelector", required=("key",), key=Str, name=Str.defaulting(""), optional=Bool),
    fieldRef=ObjectFieldSelector,
    fileKeyRef=obj(
        "FileKeySelector", required=("key", "path", "volumeName"),
        key=Str, optional=Bool.defaulting(False), path=Str, volumeName=Str,
    ),
    resourceFieldRef=ResourceFieldSelector,
    secretKeyRef=obj("SecretKeySelector", required=("key",), key=Str, name=Str.defaulting(""), optional=Bool),
)
EnvVar = obj(
    "EnvVar",
    required=("name",),
    name=Str.doc("Environment variable name."),
    value=Str.doc("Value; $(VAR) references to earlier variables are expanded."),
    valueFrom=EnvVarSource.doc("Source of the value (Kubernetes only: the local runtime rejects it)."),
)
EnvFromSource = obj(
    "EnvFromSource",
    configMapRef=obj("ConfigMapEnvSource", name=Str.defaulting(""), optional=Bool),
    prefix=Str,
    secretRef=obj("SecretEnvSource", name=Str.defaulting(""), optional=Bool),
)
HTTPHeader = obj("HTTPHeader", required=("name", "value"), name=Str, value=Str)
ExecAction = obj("ExecAction", command=Strs)
HTTPGetAction = obj(
    "HTTPGetAction", required=("port",),
    host=Str, httpHeaders=array(HTTPHeader), path=Str, port=IntOrStr, scheme=Str,
)
TCPSocketAction = obj("TCPSocketAction", required=("port",), host=Str, port=IntOrStr)
Probe = obj(
    "Probe",
    "Health check; path, port and timings are honoured locally.",
    exec=ExecAction,
    failureThreshold=Int,
    grpc=obj("GRPCAction", required=("port",), port=Int, service=Str.defaulting("")),
    httpGet=HTTPGetAction,
    initialDelaySeconds=Int,
    periodSeconds=Int,
    successThreshold=Int,
    tcpSocket=TCPSocketAction,
    terminationGracePeriodSeconds=Int64,
    timeoutSeconds=Int,
)
LifecycleHandler = obj(
    "LifecycleHandler",
    exec=ExecAction,
    httpGet=HTTPGetAction,
    sleep=obj("SleepAction", required=("seconds",), seconds=Int64),
    tcpSocket=TCPSocketAction,
)
ResourceRequirements = obj(
    "ResourceRequirements",
    "Compute resources. Locally, nvidia.com/gpu claims CUDA devices and cpu bounds threads.",
    claims=array(obj("ResourceClaim", required=("name",), name=Str, request=Str)).keyed("name"),
    limits=ResourceList,
    requests=ResourceList,
)
SELinuxOptions = obj("SELinuxOptions", level=Str, role=Str, type=Str, user=Str)
WindowsSecurityContextOptions = obj(
    "WindowsSecurityContextOptions",
    gmsaCredentialSpec=Str, gmsaCredentialSpecName=Str, hostProcess=Bool, runAsUserName=Str,
)
AppArmorProfile = obj("AppArmorProfile", required=("type",), localhostProfile=Str, type=Str)
SeccompProfile = obj("SeccompProfile", required=("type",), localhostProfile=Str, type=Str)
SecurityContext = obj(
    "SecurityContext",
    allowPrivilegeEscalation=Bool,
    appArmorProfile=AppArmorProfile,
    capabilities=obj("Capabilities", add=Strs, drop=Strs),
    privileged=Bool,
    procMount=Str,
    readOnlyRootFilesystem=Bool,
    runAsGroup=Int64,
    runAsNonRoot=Bool,
    runAsUser=Int64,
    seLinuxOptions=SELinuxOptions,
    seccompProfile=SeccompProfile,
    windowsOptions=WindowsSecurityContextOptions,
)
ContainerPort = obj(
    "ContainerPort",
    required=("containerPort",),
    containerPort=Int.bounded(1, 65535).doc("Port number the container listens on (1-65535)."),
    hostIP=Str,
    hostPort=Int.bounded(1, 65535),
    name=Str,
    protocol=Str.defaulting("TCP").doc("TCP (default), UDP or SCTP."),
)
VolumeMount = obj(
    "VolumeMount",
    required=("mountPath", "name"),
    mountPath=Str.doc("Path inside the container; merge key for volumeMounts."),
    mountPropagation=Str,
    name=Str.doc("Name of a volume in the pod spec."),
    readOnly=Bool,
    recursiveReadOnly=Str,
    subPath=Str,
    subPathExpr=Str,
)
Container = obj(
    "Container",
    "A container. The one named `main` is the model server.",
    required=("name",),
    args=Strs.doc("Arguments; they extend the engine flags generated from structured fields. "
                  "A later layer replaces the list whole."),
    command=Strs.doc("Entrypoint; a later layer replaces the list whole."),
    env=array(EnvVar, "Environment variables, merged by name across layers.").keyed("name"),
    envFrom=array(EnvFromSource),
    image=Str.doc("Container image (Kubernetes); the local runtime runs llmisvc's own engine and ignores it."),
    imagePullPolicy=Str,
    lifecycle=obj("Lifecycle", postStart=LifecycleHandler, preStop=LifecycleHandler, stopSignal=Str),
    livenessProbe=Probe,
    name=Str.doc("Container name; merge key for containers."),
    ports=array(ContainerPort, "Ports, merged by containerPort across layers.").keyed("containerPort", "protocol"),
    readinessProbe=Probe,
    resizePolicy=array(obj(
        "ContainerResizePolicy", required=("resourceName", "restartPolicy"), resourceName=Str, restartPolicy=Str,
    )),
    resources=ResourceRequirements,
    restartPolicy=Str,
    restartPolicyRules=array(obj(
        "ContainerRestartRule",
        required=("action",),
        action=Str,
        exitCodes=obj("ContainerRestartRuleOnExitCodes", required=("operator",), operator=Str,
                      values=array(Int).unique()),
    )),
    securityContext=SecurityContext,
    startupProbe=Probe,
    stdin=Bool,
    stdinOnce=Bool,
    terminationMessagePath=Str,
    terminationMessagePolicy=Str,
    tty=Bool,
    volumeDevices=array(obj("VolumeDevice", required=("devicePath", "name"), devicePath=Str, name=Str)).keyed("devicePath"),
    volumeMounts=array(VolumeMount, "Volume mounts, merged by mountPath across layers.").keyed("mountPath"),
    workingDir=Str,
)
EphemeralContainer = Container.extended(targetContainerName=Str).doc("A debugging container.").named("EphemeralContainer")

# --- volumes ------------------------------------------------------------------------------

SecretRef = LocalObjectReference
DownwardAPIVolumeFile = obj(
    "DownwardAPIVolumeFile",
    required=("path",),
    fieldRef=ObjectFieldSelector,
    mode=Int,
    path=Str,
    resourceFieldRef=ResourceFieldSelector,
)
TypedLocalObjectReference = obj(
    "TypedLocalObjectReference", required=("kind", "name"), apiGroup=Str, kind=Str, name=Str,
)
PersistentVolumeClaimSpec = obj(
    "PersistentVolumeClaimSpec",
    accessModes=Strs,
    dataSource=TypedLocalObjectReference,
    dataSourceRef=obj(
        "TypedObjectReference", required=("kind", "name"), apiGroup=Str, kind=Str, name=Str, namespace=Str,
    ),
    resources=obj("VolumeResourceRequirements", limits=ResourceList, requests=ResourceList),
    selector=LabelSelector,
    storageClassName=Str,
    volumeAttributesClassName=Str,
    volumeMode=Str,
    volumeName=Str,
)
VolumeProjection = obj(
    "VolumeProjection",
    clusterTrustBundle=obj(
        "ClusterTrustBundleProjection", required=("path",),
        labelSelector=LabelSelector, name=Str, optional=Bool, path=Str, signerName=Str,
    ),
    configMap=obj("ConfigMapProjection", items=array(KeyToPath), name=Str.defaulting(""), optional=Bool),
    downwardAPI=obj("DownwardAPIProjection", items=array(DownwardAPIVolumeFile)),
    podCertificate=obj(
        "PodCertificateProjection", required=("keyType", "signerName"),
        certificateChainPath=Str, credentialBundlePath=Str, keyPath=Str, keyType=Str,
        maxExpirationSeconds=Int, signerName=Str,
    ),
    secret=obj("SecretProjection", items=array(KeyToPath), name=Str.defaulting(""), optional=Bool),
    serviceAccountToken=obj(
        "ServiceAccountTokenProjection", required=("path",), audience=Str, expirationSeconds=Int64, path=Str,
    ),
)
Volume = obj(
    "Volume",
    "A pod volume, rendered for Kubernetes.",
    required=("name",),
    awsElasticBlockStore=obj(
        "AWSElasticBlockStoreVolumeSource", required=("volumeID",),
        fsType=Str, partition=Int, readOnly=Bool, volumeID=Str,
    ),
    azureDisk=obj(
        "AzureDiskVolumeSource", required=("diskName", "diskURI"),
        cachingMode=Str, diskName=Str, diskURI=Str, fsType=Str.defaulting("ext4"), kind=Str,
        readOnly=Bool.defaulting(False),
    ),
    azureFile=obj(
        "AzureFileVolumeSource", required=("secretName", "shareName"), readOnly=Bool, secretName=Str, shareName=Str,
    ),
    cephfs=obj(
        "CephFSVolumeSource", required=("monitors",),
        monitors=Strs, path=Str, readOnly=Bool, secretFile=Str, secretRef=SecretRef, user=Str,
    ),
    cinder=obj(
        "CinderVolumeSource", required=("volumeID",), fsType=Str, readOnly=Bool, secretRef=SecretRef, volumeID=Str,
    ),
    configMap=obj(
        "ConfigMapVolumeSource", defaultMode=Int, items=array(KeyToPath), name=Str.defaulting(""), optional=Bool,
    ),
    csi=obj(
        "CSIVolumeSource", required=("driver",),
        driver=Str, fsType=Str, nodePublishSecretRef=SecretRef, readOnly=Bool, volumeAttributes=Labels,
    ),
    downwardAPI=obj("DownwardAPIVolumeSource", defaultMode=Int, items=array(DownwardAPIVolumeFile)),
    emptyDir=obj("EmptyDirVolumeSource", medium=Str, sizeLimit=Quantity),
    ephemeral=obj(
        "EphemeralVolumeSource",
        volumeClaimTemplate=obj(
            "PersistentVolumeClaimTemplate", required=("spec",),
            metadata=ObjectMeta,
            spec=PersistentVolumeClaimSpec,
        ),
    ),
    fc=obj("FCVolumeSource", fsType=Str, lun=Int, readOnly=Bool, targetWWNs=Strs, wwids=Strs),
    flexVolume=obj(
        "FlexVolumeSource", required=("driver",),
        driver=Str, fsType=Str, options=Labels, readOnly=Bool, secretRef=SecretRef,
    ),
    flocker=obj("FlockerVolumeSource", datasetName=Str, datasetUUID=Str),
    gcePersistentDisk=obj(
        "GCEPersistentDiskVolumeSource", required=("pdName",), fsType=Str, partition=Int, pdName=Str, readOnly=Bool,
    ),
    gitRepo=obj("GitRepoVolumeSource", required=("repository",), directory=Str, repository=Str, revision=Str),
    glusterfs=obj("GlusterfsVolumeSource", required=("endpoints", "path"), endpoints=Str, path=Str, readOnly=Bool),
    hostPath=obj("HostPathVolumeSource", required=("path",), path=Str, type=Str),
    image=obj("ImageVolumeSource", pullPolicy=Str, reference=Str),
    iscsi=obj(
        "ISCSIVolumeSource", required=("iqn", "lun", "targetPortal"),
        chapAuthDiscovery=Bool, chapAuthSession=Bool, fsType=Str, initiatorName=Str, iqn=Str,
        iscsiInterface=Str.defaulting("default"), lun=Int, portals=Strs, readOnly=Bool, secretRef=SecretRef,
        targetPortal=Str,
    ),
    name=Str.doc("Volume name; merge key for volumes."),
    nfs=obj("NFSVolumeSource", required=("path", "server"), path=Str, readOnly=Bool, server=Str),
    persistentVolumeClaim=obj(
        "PersistentVolumeClaimVolumeSource", required=("claimName",), claimName=Str, readOnly=Bool,
    ),
    photonPersistentDisk=obj("PhotonPersistentDiskVolumeSource", required=("pdID",), fsType=Str, pdID=Str),
    portworxVolume=obj("PortworxVolumeSource", required=("volumeID",), fsType=Str, readOnly=Bool, volumeID=Str),
    projected=obj("ProjectedVolumeSource", defaultMode=Int, sources=array(VolumeProjection)),
    quobyte=obj(
        "QuobyteVolumeSource", required=("registry", "volume"),
        group=Str, readOnly=Bool, registry=Str, tenant=Str, user=Str, volume=Str,
    ),
    rbd=obj(
        "RBDVolumeSource", required=("image", "monitors"),
        fsType=Str, image=Str, keyring=Str.defaulting("/etc/ceph/keyring"), monitors=Strs, pool=Str.defaulting("rbd"),
        readOnly=Bool, secretRef=SecretRef, user=Str.defaulting("admin"),
    ),
    scaleIO=obj(
        "ScaleIOVolumeSource", required=("gateway", "secretRef", "system"),
        fsType=Str.defaulting("xfs"), gateway=Str, protectionDomain=Str, readOnly=Bool, secretRef=SecretRef,
        sslEnabled=Bool, storageMode=Str.defaulting("ThinProvisioned"), storagePool=Str, system=Str, volumeName=Str,
    ),
    secret=obj("SecretVolumeSource", defaultMode=Int, items=array(KeyToPath), optional=Bool, secretName=Str),
    storageos=obj(
        "StorageOSVolumeSource", fsType=Str, readOnly=Bool, secretRef=SecretRef, volumeName=Str, volumeNamespace=Str,
    ),
    vsphereVolume=obj(
        "VsphereVirtualDiskVolumeSource", required=("volumePath",),
        fsType=Str, storagePolicyID=Str, storagePolicyName=Str, volumePath=Str,
    ),
)

# --- pod ----------------------------------------------------------------------------------

Toleration = obj(
    "Toleration", effect=Str, key=Str, operator=Str, tolerationSeconds=Int64, value=Str,
)
TopologySpreadConstraint = obj(
    "TopologySpreadConstraint",
    required=("maxSkew", "topologyKey", "whenUnsatisfiable"),
    labelSelector=LabelSelector,
    matchLabelKeys=Strs,
    maxSkew=Int,
    minDomains=Int,
    nodeAffinityPolicy=Str,
    nodeTaintsPolicy=Str,
    topologyKey=Str,
    whenUnsatisfiable=Str,
)
PodSecurityContext = obj(
    "PodSecurityContext",
    appArmorProfile=AppArmorProfile,
    fsGroup=Int64,
    fsGroupChangePolicy=Str,
    runAsGroup=Int64,
    runAsNonRoot=Bool,
    runAsUser=Int64,
    seLinuxChangePolicy=Str,
    seLinuxOptions=SELinuxOptions,
    seccompProfile=SeccompProfile,
    supplementalGroups=array(Int64),
    supplementalGroupsPolicy=Str,
    sysctls=array(obj("Sysctl", required=("name", "value"), name=Str, value=Str)),
    windowsOptions=WindowsSecurityContextOptions,
)
PodSpec = obj(
    "PodSpec",
    "Pod template for a workload. Fields the local runtime cannot use are kept and "
    "carried to Kubernetes rendering.",
    activeDeadlineSeconds=Int64,
    affinity=Affinity,
    automountServiceAccountToken=Bool,
    containers=array(Container, "Containers, merged by name across layers; `main` is the model server.").keyed("name"),
    dnsConfig=obj(
        "PodDNSConfig", nameservers=Strs, options=array(obj("PodDNSConfigOption", name=Str, value=Str)), searches=Strs,
    ),
    dnsPolicy=Str,
    enableServiceLinks=Bool,
    ephemeralContainers=array(EphemeralContainer).keyed("name"),
    hostAliases=array(obj("HostAlias", required=("ip",), hostnames=Strs, ip=Str)).keyed("ip"),
    hostIPC=Bool,
    hostNetwork=Bool,
    hostPID=Bool,
    hostUsers=Bool,
    hostname=Str,
    hostnameOverride=Str,
    imagePullSecrets=array(LocalObjectReference).keyed("name"),
    initContainers=array(Container, "Init containers, merged by name across layers.").keyed("name"),
    nodeName=Str,
    nodeSelector=Labels,
    os=obj("PodOS", required=("name",), name=Str),
    overhead=ResourceList,
    preemptionPolicy=Str,
    priority=Int,
    priorityClassName=Str,
    readinessGates=array(obj("PodReadinessGate", required=("conditionType",), conditionType=Str)),
    resourceClaims=array(obj(
        "PodResourceClaim", required=("name",), name=Str, resourceClaimName=Str, resourceClaimTemplateName=Str,
    )).keyed("name"),
    resources=ResourceRequirements,
    restartPolicy=Str,
    runtimeClassName=Str,
    schedulerName=Str,
    schedulingGates=array(obj("PodSchedulingGate", required=("name",), name=Str)).keyed("name"),
    securityContext=PodSecurityContext,
    serviceAccount=Str,
    serviceAccountName=Str,
    setHostnameAsFQDN=Bool,
    shareProcessNamespace=Bool,
    subdomain=Str,
    terminationGracePeriodSeconds=Int64,
    tolerations=array(Toleration),
    topologySpreadConstraints=array(TopologySpreadConstraint).keyed("topologyKey", "whenUnsatisfiable"),
    volumes=array(Volume, "Volumes, merged by name across layers.").keyed("name"),
)

# --- autoscaling/v2 -----------------------------------------------------------------------

HPAScalingRules = obj(
    "HPAScalingRules",
    policies=array(obj(
        "HPAScalingPolicy", required=("periodSeconds", "type", "value"), periodSeconds=Int, type=Str, value=Int,
    )),
    selectPolicy=Str,
    stabilizationWindowSeconds=Int,
    tolerance=Quantity,
)
HorizontalPodAutoscalerBehavior = obj(
    "HorizontalPodAutoscalerBehavior", scaleDown=HPAScalingRules, scaleUp=HPAScalingRules,
)

# --- Gateway API v1 -----------------------------------------------------------------------

# Name and value formats of Kubernetes and Gateway API fields, as their OpenAPI schemas state them.
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
API_GROUP = r"^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
KIND = r"^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$"
HEADER_NAME = r"^[A-Za-z0-9!#$%&'*+\-.^_\x60|~]+$"
DURATION = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"
WILDCARD_HOSTNAME = r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
CORS_ORIGIN = r"(^\*$)|(^(http(s)?):\/\/(((\*\.)?([a-zA-Z0-9\-]+\.)*[a-zA-Z0-9-]+|\*)(:([0-9]{1,5}))?)$)"
URI_PATH = r"^(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|[%][0-9a-fA-F]{2})+$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"

GroupName = Str.matching(API_GROUP).length(None, 253)
KindName = Str.matching(KIND).length(1, 63)
ObjectName = Str.length(1, 253)
NamespaceName = Str.matching(DNS_LABEL).length(1, 63)
SectionName = Str.matching(DNS_SUBDOMAIN).length(1, 253)
HeaderName = Str.matching(HEADER_NAME).length(1, 256)
HeaderNames = array(HeaderName).sized(None, 64).unique()
Duration = Str.matching(DURATION).doc("Duration such as 10s, 1m or 500ms (Gateway API format).")
PortNumber = Int.bounded(1, 65535)
HTTPMethods = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")

ParentReference = obj(
    "ParentReference",
    required=("name",),
    group=GroupName.defaulting("gateway.networking.k8s.io"),
    kind=KindName.defaulting("Gateway"),
    name=ObjectName,
    namespace=NamespaceName,
    port=PortNumber,
    sectionName=SectionName,
)
BackendObjectReference = obj(
    "BackendObjectReference",
    required=("name",),
    group=GroupName.defaulting(""),
    kind=KindName.defaulting("Service"),
    name=ObjectName,
    namespace=NamespaceName,
    port=PortNumber,
)
HTTPHeaderPair = obj(
    "HTTPHeader", required=("name", "value"), name=HeaderName, value=Str.length(1, 4096),
)
HTTPHeaderFilter = obj(
    "HTTPHeaderFilter",
    add=array(HTTPHeaderPair).sized(None, 16).keyed("name"),
    remove=Strs.sized(None, 16).unique(),
    set=array(HTTPHeaderPair).sized(None, 16).keyed("name"),
)
HTTPPathModifier = obj(
    "HTTPPathModifier",
    required=("type",),
    replaceFullPath=Str.length(None, 1024),
    replacePrefixMatch=Str.length(None, 1024),
    type=Str.one_of("ReplaceFullPath", "ReplacePrefixMatch"),
)
PreciseHostname = Str.matching(DNS_SUBDOMAIN).length(1, 253)
HTTPRouteFilter = obj(
    "HTTPRouteFilter",
    required=("type",),
    cors=obj(
        "HTTPCORSFilter",
        allowCredentials=Bool,
        allowHeaders=HeaderNames,
        allowMethods=array(Str.one_of(*HTTPMethods, "*")).sized(None, 9).unique(),
        allowOrigins=array(Str.matching(CORS_ORIGIN).length(1, 253)).sized(None, 64).unique(),
        exposeHeaders=HeaderNames,
        maxAge=Int.bounded(1).defaulting(5),
    ),
    extensionRef=obj(
        "LocalObjectReference", required=("group", "kind", "name"),
        group=GroupName, kind=KindName, name=ObjectName,
    ),
    externalAuth=obj(
        "HTTPExternalAuthFilter",
        required=("backendRef", "protocol"),
        backendRef=BackendObjectReference,
        forwardBody=obj("ForwardBodyConfig", maxSize=Int),
        grpc=obj("GRPCAuthConfig", allowedHeaders=Strs.sized(None, 64).unique()),
        http=obj(
            "HTTPAuthConfig",
            allowedHeaders=Strs.sized(None, 64).unique(),
            allowedResponseHeaders=Strs.sized(None, 64).unique(),
            path=Str.matching(URI_PATH).length(None, 1024),
        ),
        protocol=Str.one_of("HTTP", "GRPC"),
    ),
    requestHeaderModifier=HTTPHeaderFilter,
    requestMirror=obj(
        "HTTPRequestMirrorFilter",
        required=("backendRef",),
        backendRef=BackendObjectReference,
        fraction=obj(
            "Fraction", required=("numerator",),
            denominator=Int.bounded(1).defaulting(100), numerator=Int.bounded(0),
        ),
        percent=Int.bounded(0, 100),
    ),
    requestRedirect=obj(
        "HTTPRequestRedirectFilter",
        hostname=PreciseHostname,
        path=HTTPPathModifier,
        port=PortNumber,
        scheme=Str.one_of("http", "https"),
        statusCode=Int.one_of(301, 302, 303, 307, 308).defaulting(302),
    ),
    responseHeaderModifier=HTTPHeaderFilter,
    type=Str.one_of(
        "RequestHeaderModifier", "ResponseHeaderModifier", "RequestMirror", "RequestRedirect",
        "URLRewrite", "ExtensionRef", "CORS",
    ),
    urlRewrite=obj("HTTPURLRewriteFilter", hostname=PreciseHostname, path=HTTPPathModifier),
)
HTTPRouteFilters = array(HTTPRouteFilter, "Filters applied to matching requests, in order.").sized(None, 16)
MatchType = Str.one_of("Exact", "RegularExpression").defaulting("Exact")
DEFAULT_PATH_MATCH = {"type": "PathPrefix", "value": "/"}
HTTPRouteRule = obj(
    "HTTPRouteRule",
    backendRefs=array(obj(
        "HTTPBackendRef",
        required=("name",),
        filters=HTTPRouteFilters,
        group=GroupName.defaulting(""),
        kind=KindName.defaulting("Service"),
        name=ObjectName,
        namespace=NamespaceName,
        port=PortNumber,
        weight=Int.bounded(0, 1000000).defaulting(1),
    )).sized(None, 16),
    filters=HTTPRouteFilters,
    matches=array(obj(
        "HTTPRouteMatch",
        headers=array(obj(
            "HTTPHeaderMatch", required=("name", "value"),
            name=HeaderName, type=MatchType, value=Str.length(1, 4096),
        )).sized(None, 16).keyed("name"),
        method=Str.one_of(*HTTPMethods),
        path=obj(
            "HTTPPathMatch",
            type=Str.one_of("Exact", "PathPrefix", "RegularExpression").defaulting("PathPrefix"),
            value=Str.length(None, 1024).defaulting("/"),
        ).defaulting(dict(DEFAULT_PATH_MATCH)),
        queryParams=array(obj(
            "HTTPQueryParamMatch", required=("name", "value"),
            name=HeaderName, type=MatchType, value=Str.length(1, 1024),
        )).sized(None, 16).keyed("name"),
    )).sized(None, 64).defaulting([{"path": dict(DEFAULT_PATH_MATCH)}]),
    name=Str.matching(DNS_SUBDOMAIN).length(1, 253).doc("Rule name, for status and policy references."),
    retry=obj("HTTPRouteRetry", attempts=Int, backoff=Duration, codes=array(Int.bounded(400, 599))),
    sessionPersistence=obj(
        "SessionPersistence",
        absoluteTimeout=Duration,
        cookieConfig=obj("CookieConfig", lifetimeType=Str.one_of("Permanent", "Session").defaulting("Session")),
        idleTimeout=Duration,
        sessionName=Str.length(None, 128),
        type=Str.one_of("Cookie", "Header").defaulting("Cookie"),
    ),
    timeouts=obj(
        "HTTPRouteTimeouts",
        "Request timeouts; 0s disables a timeout, which long streamed generations need.",
        backendRequest=Duration.doc("Timeout of one request to a backend; at most `request`."),
        request=Duration.doc("Timeout of the whole client request."),
    ),
)
HTTPRouteSpec = obj(
    "HTTPRouteSpec",
    "A Gateway API HTTPRoute spec managed for the service (Kubernetes); locally the "
    "llmisvc gateway serves the route itself.",
    hostnames=array(Str.matching(WILDCARD_HOSTNAME).length(1, 253), "Host names the route answers for.").sized(None, 16),
    parentRefs=array(ParentReference, "Gateways (or other parents) the route attaches to.").sized(None, 32),
    rules=array(HTTPRouteRule, "Routing rules: matches, filters and backends.").sized(1, 16).defaulting(
        [{"matches": [{"path": dict(DEFAULT_PATH_MATCH)}]}]
    ),
    useDefaultGateways=Str.one_of("All", "None"),
)

# --- Gateway API Inference Extension --------------------------------------------------------

InferencePoolSpecV1 = obj(
    "InferencePoolSpec",
    "An inference.networking.k8s.io/v1 InferencePool spec.",
    required=("endpointPickerRef", "selector", "targetPorts"),
    appProtocol=Str.one_of("http", "kubernetes.io/h2c").defaulting("http"),
    endpointPickerRef=obj(
        "EndpointPickerRef",
        required=("name",),
        failureMode=Str.one_of("FailOpen", "FailClose").defaulting("FailClose"),
        group=GroupName.length(0, 253).defaulting(""),
        kind=KindName.defaulting("Service"),
        name=ObjectName,
        port=obj("Port", required=("number",), number=PortNumber),
    ),
    selector=obj(
        "LabelSelector", required=("matchLabels",),
        matchLabels=string_map(Str.matching(LABEL_VALUE).length(0, 63)),
    ),
    targetPorts=array(
        obj("Port", required=("number",), number=PortNumber), "Ports of the model servers that receive traffic.",
    ).sized(1, 8),
)
InferencePoolSpecV1Alpha2 = obj(
    "InferencePoolSpec",
    "An inference.networking.x-k8s.io/v1alpha2 InferencePool spec.",
    required=("selector", "targetPortNumber"),
    extensionRef=obj(
        "Extension",
        required=("failureMode", "name"),
        failureMode=Str.one_of("FailOpen", "FailClose"),
        group=GroupName,
        kind=KindName,
        name=ObjectName,
        portNumber=PortNumber,
    ),
    selector=string_map(Str.length(0, 63)),
    targetPortNumber=Int,
)
